"""--quantize int8: every constant-weight MatMul (factors included) is int8; check and quality run on the int8 file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from factordeploy.cli import main
from factordeploy.engines.ort_model import OrtModel
from factordeploy.engines.quantize import quantize_int8
from factordeploy.export import export_onnx
from factordeploy.models import load_model
from factordeploy.serve.generate import SamplingConfig, open_folder
from factordeploy.verify.fidelity import check_plan, compare_torch_onnx


@pytest.fixture(scope="module")
def int8_build(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-svd-int8"
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_llama_dir), "--method", "svd", "--ratio", "0.5",
                                  "--quantize", "int8", "--out", str(out), "--no-baseline", "--backend", "ort", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "int8 artifact:" in r.output
    return out, json.loads((out / "report.json").read_text())


def test_int8_artifact_quantizes_every_factor_matmul(int8_build):
    out, rep = int8_build
    q = rep["quantize"]
    assert q["matmuls_quantized"] == q["matmuls_total"] > 2 * 7 * 2  # 2 blocks x 7 layers x 2 factors + the LM head
    # the tied embedding is stored twice in int8 (Gather table + pre-transposed LM head): 2 x 1/4 of fp32
    assert q["bytes_after"] < 0.55 * q["bytes_before"]
    assert not (out / "model.fp32.onnx").exists()
    g = onnx.load(str(out / "model.onnx")).graph
    ops = {n.op_type for n in g.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    big_fp32 = [n for n, a in consts.items() if a.dtype == np.float32 and a.ndim == 2 and min(a.shape) > 1]
    assert not big_fp32, f"weights left in fp32: {big_fp32[:5]}"
    ranks = {lay["after"]["rank"] for lay in rep["layers"] if lay["after"].get("kind") == "lowrank"}
    int8_shapes = [a.shape for a in consts.values() if a.dtype == np.int8 and a.ndim == 2]
    assert any(min(s) in ranks for s in int8_shapes), "rank-r factors must be stored as int8"


def test_int8_check_and_quality_run_on_the_int8_file(int8_build):
    out, rep = int8_build
    f = rep["quantize"]["fidelity"]
    assert f["passed"] and f["error_stat"] == "mean" and 0 < f["mean_abs"] <= f["atol"]
    art, comp = rep["quality"]["artifact_int8"]["perplexity"], rep["quality"]["compressed"]["perplexity"]
    assert art != comp and abs(art / comp - 1) < 0.05  # the int8 file was scored, and it is close
    assert "int8 artifact" in (out / "report.md").read_text()


def test_int8_folder_generates(int8_build):
    out, _ = int8_build
    g = open_folder(out).generate("The city of", SamplingConfig(max_new_tokens=6, ignore_eos=True))
    assert len(g.new_ids) == 6


def test_int8_check_can_fail(int8_build, tiny_llama_dir, tmp_path):
    """A tampered int8 file (weight scales x3) fails the mean-error check that the real one passes."""
    out, rep = int8_build
    proto = onnx.load(str(out / "model.onnx"))
    for init in proto.graph.initializer:
        if init.name.endswith("_scale") and init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save_model(proto, str(bad))
    loaded = load_model(str(tiny_llama_dir))
    from factordeploy.compress.base import CompressContext, get_method
    from factordeploy.compress.targets import find_targets

    get_method("svd").compress(loaded.model, find_targets(loaded.model), CompressContext(ratio=0.5))
    plan = check_plan(loaded, loaded.model, decode_steps=1)
    atol = rep["quantize"]["fidelity"]["atol"]
    res = compare_torch_onnx(plan.fn, str(bad), plan.feeds, plan.input_names, plan.output_names, atol=atol, rtol=0.0,
                             error_stat="mean")
    assert not res.passed


def test_encoder_int8_embeddings_close_to_torch(tiny_bert_dir, tmp_path):
    loaded = load_model(str(tiny_bert_dir))
    export_onnx(loaded, loaded.model, tmp_path / "m.onnx")
    res = quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx")
    assert res.matmuls_quantized == res.matmuls_total == 2 * 6
    assert res.bytes_after < 0.3 * res.bytes_before  # no fp32 weight left beside its int8 copy
    inputs = loaded.example_inputs(2, 12)
    with torch.no_grad():
        ref = loaded.output(loaded.model, inputs)
    got = loaded.output(OrtModel(tmp_path / "q.onnx"), inputs)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min()
    assert 0.98 < float(cos) < 1.0
