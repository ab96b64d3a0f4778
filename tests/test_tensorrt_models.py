"""Every graph kind the project emits parses and builds into a TensorRT-RTX engine on the CPU.

Dense MiniLM (the original export) and SVD low-rank MiniLM (through `deploy build --backend
trt-rtx`, the full build path), plus the low-rank graph at fp16. Skipped only when
tensorrt_rtx_bindings is missing (CI installs it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                                 reason="tensorrt_rtx_bindings not installed (scripts/setup.sh installs it)")]

SMALL = dict(trt_batch="1:2:4", trt_seq="1:32:128")


@pytest.fixture(scope="module")
def svd_build(tmp_path_factory):
    """One `deploy build --method svd --ratio 0.5 --backend trt-rtx` (with the dense baseline export kept)."""
    from factordeploy.build import BuildConfig, run_build
    from factordeploy.compress.calibration import CalibrationConfig

    out = tmp_path_factory.mktemp("svd") / "out"
    cfg = BuildConfig(model="minilm", method="svd", ratio=0.5, out=str(out), backend="trt-rtx", evaluate=False,
                      baseline=True, latency_points=((1, 16),), latency_runs=2,
                      calib=CalibrationConfig(n=4, length=32), **SMALL)
    return out, run_build(cfg).report


@pytest.fixture(scope="module")
def dense_engine(svd_build, tmp_path_factory):
    """The original (dense) MiniLM export from the same build, through trt_pipeline, into an engine."""
    from factordeploy.engines import trt_module as tm
    from factordeploy.engines.tensorrt import Range3, TrtBuildConfig, build_engine
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import trt_pipeline

    out, _ = svd_build
    d = tmp_path_factory.mktemp("dense")
    proto = run_pipeline(onnx.load(str(out / "baseline.onnx")), trt_pipeline(), PassContext(target="trt"))
    onnx.save(proto, str(d / "model.trt.onnx"))
    cfg = TrtBuildConfig(out_dir=d, batch=Range3(1, 2, 4), seq=Range3(1, 32, 128))
    return build_engine(d / "model.trt.onnx", cfg, tm.resolve("trt-rtx"))


def test_dense_minilm_builds(dense_engine):
    r = dense_engine
    assert Path(r.engine_path).stat().st_size == r.engine_bytes
    # MiniLM-L6 holds ~22.7M fp32 parameters: the engine must carry them (weights are stored, not streamed)
    assert r.engine_bytes > 22e6 * 4 * 0.95
    assert r.network_layers > 300 and r.layers > 0 and r.layer_types.get("gemm", 0) >= 6 * 4
    assert r.factorized_gemm_layers == 0 and r.plugin_layers == 0
    assert Path(r.log_path).stat().st_size > 0 and not r.executed


def test_svd_minilm_build_command_writes_engine_log_and_report(svd_build, dense_engine, tmp_path):
    out, report = svd_build
    e = report.engine.as_dict()
    assert e["engine_bytes"] == report.engine.result.engine_bytes and report.engine.result.engine_path == "model.engine"
    for f in ("model.onnx", "model.trt.onnx", "model.engine", "trt-build.log", "report.md", "report.json"):
        assert (out / f).exists(), f
    assert e["backend"] == "trt-rtx" and e["requested"] == "trt-rtx" and e["precision"] == "fp32"
    assert e["engine_bytes"] == (out / "model.engine").stat().st_size
    # factored weights stay factored: fewer bytes than the dense engine, low-rank GEMMs named fd/... present
    assert e["engine_bytes"] < dense_engine.engine_bytes * 0.9
    assert e["factorized_gemm_layers"] > 0 and e["layers"] > 0 and e["build_seconds"] > 0
    assert e["executed"] is False and e["reason"]
    assert e["profile"]["input_ids"] == {"min": [1, 1], "opt": [2, 32], "max": [4, 128]}
    md = (out / "report.md").read_text()
    assert "## Engine backend" in md and "engine size" in md and "Executed: **no**" in md
    assert json.loads((out / "report.json").read_text())["engine"]["engine_path"] == "model.engine"


def test_lowrank_fp16_engine_halves_weights(svd_build, tmp_path):
    from factordeploy.engines import trt_module as tm
    from factordeploy.engines.tensorrt import Range3, TrtBuildConfig, build_engine
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.precision import to_precision

    out, report = svd_build
    m16 = run_pipeline(onnx.load(str(out / "model.trt.onnx")), [to_precision("fp16")], PassContext())
    onnx.save(m16, str(tmp_path / "fp16.trt.onnx"))
    r16 = build_engine(tmp_path / "fp16.trt.onnx", TrtBuildConfig(out_dir=tmp_path / "e16", precision="fp16",
                       batch=Range3(1, 2, 4), seq=Range3(1, 32, 128)), tm.resolve("trt-rtx"))
    fp32_bytes = report.engine.result.engine_bytes
    assert 0.4 * fp32_bytes < r16.engine_bytes < 0.6 * fp32_bytes

    # the fp16 graph TensorRT was given, run by ONNX Runtime against the fp32 model.onnx (padded row included)
    from factordeploy.engines.ort import random_feeds
    from factordeploy.verify.fidelity import compare_onnx_graphs

    feeds = random_feeds(["input_ids", "attention_mask", "token_type_ids"], 2, 24, 30000)
    feeds["attention_mask"][1, 15:] = 0
    g = compare_onnx_graphs(str(out / "model.onnx"), str(tmp_path / "fp16.trt.onnx"), [feeds])
    assert not g.nan and g.max_abs < 0.05 * g.reference_max_abs and g.mean_abs < 5e-3
