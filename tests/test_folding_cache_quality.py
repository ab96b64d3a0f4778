"""Constant folding never refolds factorized layers and respects its size limit; the baseline ONNX
export cache hits; decoder perplexity equals a hand computation on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import numpy_helper

from factordeploy.passes.basic import FOLD_SIZE_LIMIT, fold_constants
from factordeploy.passes.pipeline import PassContext, run_pipeline


def _fold_graph() -> onnx.ModelProto:
    """x -> [fd/l low-rank: MatMul(x, A) -> MatMul(., B)] + [fd/l: MatMul(A2, B2) all-constant product]
    + Transpose of a small constant (folds) + Transpose of a big constant (over the size limit)."""
    rng = np.random.default_rng(0)
    f = np.float32
    x = gs.Variable("x", f, ["N", 16])
    z = gs.Variable("z", f, ["N", None])
    A, B = gs.Constant("A", rng.standard_normal((16, 4)).astype(f)), gs.Constant("B", rng.standard_normal((4, 8)).astype(f))
    A2, B2 = gs.Constant("A2", rng.standard_normal((8, 2)).astype(f)), gs.Constant("B2", rng.standard_normal((2, 8)).astype(f))
    big_n = int(math.isqrt(FOLD_SIZE_LIMIT // 4)) + 8  # a big_n x big_n fp32 constant just over the limit
    small = gs.Constant("small", rng.standard_normal((8, 8)).astype(f))
    big = gs.Constant("big", rng.standard_normal((big_n, big_n)).astype(f))
    h, y, w, o, st, bt, s1, bsum, out = (gs.Variable(n, f) for n in ("h", "y", "w", "o", "st", "bt", "s1", "bsum", "out"))
    nodes = [
        gs.Node("MatMul", "fd/l/lowrank/MatMul_0", inputs=[x, A], outputs=[h]),
        gs.Node("MatMul", "fd/l/lowrank/MatMul_1", inputs=[h, B], outputs=[y]),
        gs.Node("MatMul", "fd/l/lowrank/MatMul_2", inputs=[A2, B2], outputs=[w]),  # constant-only product
        gs.Node("MatMul", "mm_w", inputs=[y, w], outputs=[o]),
        gs.Node("Transpose", "t_small", attrs={"perm": [1, 0]}, inputs=[small], outputs=[st]),
        gs.Node("MatMul", "mm_small", inputs=[o, st], outputs=[s1]),
        gs.Node("Transpose", "t_big", attrs={"perm": [1, 0]}, inputs=[big], outputs=[bt]),
        gs.Node("MatMul", "mm_big", inputs=[z, bt], outputs=[bsum]),  # reads the activation: t_big alone could fold
        gs.Node("Add", "add", inputs=[s1, gs.Constant("zero", np.zeros((1, 8), f))], outputs=[out]),
    ]
    z.shape = ["N", big_n]
    g = gs.Graph(nodes=nodes, inputs=[x, z], outputs=[out, bsum], opset=18)
    return gs.export_onnx(g.cleanup().toposort())


def test_fold_constants_keeps_factorized_products_and_respects_the_size_limit():
    m = _fold_graph()
    ctx = PassContext()
    out = run_pipeline(m, [fold_constants], ctx)
    names = {n.name for n in out.graph.node}
    # every multi-input node of the factorized layer survives, the all-constant A2 @ B2 included
    assert {"fd/l/lowrank/MatMul_0", "fd/l/lowrank/MatMul_1", "fd/l/lowrank/MatMul_2"} <= names
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert not any(a.shape == (16, 8) for a in inits.values()), "low-rank A @ B was refolded into a dense W"
    assert not any(a.shape == (8, 8) and np.allclose(a, inits["A2"] @ inits["B2"]) for a in inits.values())
    assert "t_small" not in names  # a small constant Transpose folds
    assert "t_big" in names  # folding it would store a second copy over FOLD_SIZE_LIMIT
    note = ctx.info["fold-constants"]
    assert note["protected_nodes"] == 3 and note["size_limit_bytes"] == FOLD_SIZE_LIMIT
    # and folding changed no value
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32),
             "z": rng.standard_normal((3, m.graph.input[1].type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)}
    run = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(run(m), run(out)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_baseline_export_cache_hit(tiny_bert_dir, tmp_path, monkeypatch):
    from factordeploy.export import onnx_export
    from factordeploy.models import load_model

    monkeypatch.setenv("FACTORDEPLOY_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(tiny_bert_dir))
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert onnx_export.export_original_cached(loaded, loaded.model, first) is False  # miss: exported and stored
    calls = []
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: calls.append(a))
    assert onnx_export.export_original_cached(loaded, loaded.model, second) is True  # hit: copied, not exported
    assert calls == [] and second.read_bytes() == first.read_bytes()
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 1


def test_decoder_perplexity_matches_hand_computation(tiny_llama_dir):
    from factordeploy.models import load_model
    from factordeploy.models import text as textmod
    from factordeploy.verify.quality import EvalConfig, QualityProbe

    loaded = load_model(str(tiny_llama_dir))
    cfg = EvalConfig(ppl_windows=3, ppl_len=24)
    probe = QualityProbe(loaded, cfg)
    got = probe.capture_original(loaded.model)["perplexity"]
    # by hand: HF's own shifted-label loss per window (mean NLL of 23 predictions), averaged, exponentiated
    stream = loaded.token_ids(textmod.evaluation_articles())
    losses = []
    with torch.no_grad():
        for w in range(3):
            ids = torch.tensor([stream[w * 24:(w + 1) * 24]])
            losses.append(float(loaded.model(input_ids=ids, labels=ids).loss))
    assert got == pytest.approx(math.exp(sum(losses) / 3), rel=1e-6)  # fp32 sums differ in order only
    assert 1000 < got < 1e6  # a random tiny model: close to uniform over the ~49k vocabulary
