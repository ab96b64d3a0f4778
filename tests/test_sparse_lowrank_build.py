"""`deploy build --method sltrain|lost --backend trt-rtx` end to end on a tiny Llama: the export check
passes, model.onnx keeps the layers compressed (bytes on disk), and TensorRT-RTX builds an engine
on the CPU (SLTrain: one SparseMatMul plugin layer per compressed linear; LOST: no plugin)."""

from __future__ import annotations

import importlib.util
import json

import onnx
import pytest
from onnx import numpy_helper

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


@pytest.mark.parametrize("method,plugins", [("sltrain", True), ("lost", False)])
def test_tiny_llama_build(tiny_llama_dir, tmp_path, method, plugins):
    from factordeploy.build import BuildConfig, run_build
    from factordeploy.compress.calibration import CalibrationConfig

    out = tmp_path / "out"
    cfg = BuildConfig(model=str(tiny_llama_dir), method=method, ratio=0.5, out=str(out),
                      backend="trt-rtx" if HAS_RTX else "ort", evaluate=False, baseline=False,
                      latency_points=((1, 16),), latency_runs=1, calib=CalibrationConfig(n=4, length=32),
                      trt_batch="1:2:4", trt_seq="1:32:128")
    run_build(cfg)
    rep = json.loads((out / "report.json").read_text())
    assert rep["fidelity"]["passed"], rep["fidelity"]
    kinds = {"sltrain": "sparse_lowrank", "lost": "channel_lowrank"}
    layers = [l for l in rep["layers"] if l["after"]["kind"] == kinds[method]]
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert rep["size"]["targeted_bytes_after"] <= 0.5 * rep["size"]["targeted_bytes_before"]
    # model.onnx holds what stored_bytes counted: no dense (out x in) matrix of a compressed layer
    proto = onnx.load(str(out / "model.onnx"))
    shapes = {tuple(numpy_helper.to_array(t).shape) for t in proto.graph.initializer}
    for l in layers:
        d = l["after"]
        assert (d["in"], d["out"]) not in shapes and (d["out"], d["in"]) not in shapes, d
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # ORT graph: standard ops only
    if HAS_RTX:
        e = rep["engine"]
        assert e["backend"] == "trt-rtx" and (out / "model.engine").stat().st_size == e["engine_bytes"]
        assert e["plugin_layers"] == (14 if plugins else 0)
        trt = onnx.load(str(out / "model.trt.onnx"))
        assert sum(n.op_type == "SparseMatMul" for n in trt.graph.node) == (14 if plugins else 0)
    assert rep["method"]["name"] == method
