"""Export keeps the low-rank structure, passes name it, ONNX Runtime matches torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.layers import LowRankLinear
from factordeploy.compress.targets import find_targets
from factordeploy.engines import ort as ortmod
from factordeploy.export import export_onnx
from factordeploy.export.kv_cache import CacheSpec, step_inputs
from factordeploy.models import load_model
from factordeploy.passes.annotate import factorized_nodes, read_manifest
from factordeploy.passes.pipeline import PassContext, run_pipeline
from factordeploy.passes.presets import ort_pipeline


def _compress_export(model_dir, tmp_path, ratio=0.5):
    loaded = load_model(str(model_dir))
    targets = find_targets(loaded.model)
    res = get_method("svd").compress(loaded.model, targets, CompressContext(ratio=ratio))
    raw = tmp_path / "raw.onnx"
    export_onnx(loaded, loaded.model, raw)
    layers = {r.name: r.after for r in res.layers if r.after["kind"] != "dense"}
    ctx = PassContext(layers=layers)
    proto = run_pipeline(onnx.load(str(raw)), ort_pipeline(), ctx)
    path = tmp_path / "model.onnx"
    onnx.save_model(proto, str(path))
    return loaded, res, proto, path, ctx


def _const(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_each_lowrank_layer_stays_two_rank_r_matmuls(fixture, request, tmp_path):
    loaded, res, proto, path, ctx = _compress_export(request.getfixturevalue(fixture), tmp_path)
    lowrank = {n: m for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lowrank) == len(res.layers) == (6 if loaded.kind == "encoder" else 7) * 2  # 2 blocks
    groups = factorized_nodes(proto)
    assert set(groups) == set(lowrank)
    assert read_manifest(proto) == ctx.layers
    for name, layer in lowrank.items():
        mms = [n for n in groups[name] if n.op_type == "MatMul"]
        assert len(mms) == 2, name
        w1, w2 = _const(proto, mms[0].input[1]), _const(proto, mms[1].input[1])
        assert w1 is not None and w2 is not None, "factors must be constants (initializers)"
        r = layer.rank
        assert w1.shape == (layer.in_features, r) and w2.shape == (r, layer.out_features)
        np.testing.assert_allclose(w1, layer.A.detach().numpy().T, rtol=0, atol=0)
        np.testing.assert_allclose(w2, layer.B.detach().numpy().T, rtol=0, atol=0)
    # every initializer feeding a factorized layer's nodes is a rank-r factor or a bias, never a dense W
    for name, nodes in groups.items():
        r = lowrank[name].rank
        for n in nodes:
            for inp in n.input:
                c = _const(proto, inp)
                if c is not None and c.ndim == 2:
                    assert r in c.shape, (name, n.op_type, c.shape)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_onnxruntime_matches_torch(fixture, request, tmp_path):
    loaded, _res, _proto, path, _ = _compress_export(request.getfixturevalue(fixture), tmp_path)
    sess = ortmod.session(path)
    for batch, seq in [(1, 5), (3, 17)]:
        inputs = loaded.example_inputs(batch, seq)
        with torch.no_grad():
            ref = loaded.output(loaded.model, inputs).numpy()
        feeds = {k: v.numpy() for k, v in inputs.items()}
        if loaded.kind == "decoder":  # the KV-cache graph: a prefill with past length 0
            spec = CacheSpec.from_config(loaded.model.config)
            feeds = step_inputs(feeds["input_ids"], feeds["attention_mask"]) | spec.empty_past(batch)
        got = sess.run(None, feeds)[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)


def test_ort_optimized_model_keeps_factors(tiny_bert_dir, tmp_path):
    loaded, _res, _proto, path, _ = _compress_export(tiny_bert_dir, tmp_path)
    opt = tmp_path / "opt.onnx"
    ortmod.session(path, optimized_out=opt)
    g = onnx.load(str(opt)).graph
    inits = [numpy_helper.to_array(i) for i in g.initializer if len(i.dims) == 2]
    lowrank = [m for m in loaded.model.modules() if isinstance(m, LowRankLinear)]
    assert lowrank
    for layer in lowrank:  # both factors of every layer are still in ORT's optimized graph, value for value
        for factor in (layer.A.detach().numpy().T, layer.B.detach().numpy().T):
            assert any(a.shape == factor.shape and np.array_equal(a, factor) for a in inits), factor.shape
    dense = {(m.in_features, m.out_features) for m in lowrank}
    assert not any(a.shape in dense for a in inits), "ORT's optimizer refolded a low-rank layer into a dense W"
