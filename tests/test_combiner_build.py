"""`deploy build --attention combiner-*` end to end on tiny random models: one CombinerAttention node per layer in
the export; lowered to standard ops it matches torch at lengths that are not block multiples (dynamic length,
padded batch); kept as plugin nodes, the TensorRT-RTX engine builds with one plugin layer per attention."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from factordeploy.cli import main
from factordeploy.passes.pipeline import PassContext, run_pipeline
from factordeploy.passes.presets import ort_pipeline

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def _build(model_dir, out, attention, backend):
    r = CliRunner().invoke(main, ["build", "--model", str(model_dir), "--method", "svd", "--ratio", "0.3",
                                  "--attention", attention, "--attention-block", "8", "--seq", "1:64:128",
                                  "--batch", "1:2:4", "--backend", backend, "--no-eval", "--no-baseline", "--quiet",
                                  "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text())


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx_bindings not installed")
def test_tiny_llama_logsparse_builds_trt_rtx(tiny_llama_dir, tmp_path):
    rep = _build(tiny_llama_dir, tmp_path / "b", "combiner-logsparse", "trt-rtx")
    assert rep["attention"] == {"kind": "combiner-logsparse", "block": 8, "max_len": 128, "layers": 2, "kv_cache": False}
    assert rep["fidelity"]["passed"] and rep["fidelity"]["max_abs"] < 1e-4
    assert rep["engine"]["backend"] == "trt-rtx" and rep["engine"]["engine_bytes"] > 0
    assert rep["engine"]["plugin_layers"] == 2 and rep["engine"]["layer_types"]["custom_layer"] == 2


@pytest.mark.parametrize("kind", ["combiner-fixed", "combiner-logsparse", "combiner-axial"])
def test_exported_graph_matches_torch_at_any_length(tiny_bert_dir, tmp_path, kind):
    """One export (traced at max_len), run at lengths below, at and between block multiples, with padding."""
    from factordeploy.attention import AttentionConfig, install_combiner
    from factordeploy.export import export_onnx
    from factordeploy.models.registry import load_model

    lm = load_model(str(tiny_bert_dir))
    install_combiner(lm.model, AttentionConfig(kind=kind, block=8, max_len=128))
    export_onnx(lm, lm.model, tmp_path / "m.onnx", seq=128)
    exported = onnx.load(str(tmp_path / "m.onnx"))
    assert [n.op_type for n in exported.graph.node if n.domain == "factordeploy"] == ["CombinerAttention"] * 2
    onnx.save(run_pipeline(exported, ort_pipeline(), PassContext(layers={}, target="ort")), str(tmp_path / "ort.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "ort.onnx"))
    names = {i.name for i in sess.get_inputs()}
    for L in (3, 8, 13, 40, 128):
        ids = np.random.default_rng(L).integers(1000, 2000, (2, L)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, (L + 1) // 2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        got = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        with torch.no_grad():
            want = lm.model(**{k: torch.from_numpy(v) for k, v in feeds.items() if k in names}).last_hidden_state
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(got[1, : (L + 1) // 2], want[1, : (L + 1) // 2].numpy(), atol=1e-4, rtol=1e-3)
