"""Sparse + low-rank (SLTrain, LOST): the two layers, their byte accounting, the least-squares
steps against brute force, the fit against whitened SVD at equal bytes, and the methods' budgets."""

from __future__ import annotations

import copy

import pytest
import torch

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.budget import rank_after_extra, uniform_rank
from factordeploy.compress.layers import (ChannelSparseLowRankLinear, SparsePlusLowRankLinear, layer_bytes)
from factordeploy.compress.linalg import (channel_lstsq, damped_gram, gram_factor, output_error, support_lstsq,
                                          whitened_svd)
from factordeploy.compress.methods.lost import worst_channels
from factordeploy.compress.methods.sltrain import largest_support, random_support
from factordeploy.compress.sparse_lowrank import alternate

from .layer_export import Wrap, export_layer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def slr_layer(out_f=12, in_f=10, r=3, nnz=17, scale=1.0, seed=0) -> SparsePlusLowRankLinear:
    g = _gen(seed)
    idx = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values
    return SparsePlusLowRankLinear(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), idx,
                                   torch.randn(nnz, generator=g), torch.randn(out_f, generator=g), scale=scale)


def csl_layer(out_f=12, in_f=10, r=3, c=4, gamma=0.5, seed=0) -> ChannelSparseLowRankLinear:
    g = _gen(seed)
    ch = torch.randperm(in_f, generator=g)[:c].sort().values
    return ChannelSparseLowRankLinear(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), ch,
                                      torch.randn(out_f, c, generator=g), torch.randn(out_f, generator=g), gamma=gamma)


@pytest.mark.parametrize("scale", [1.0, 32 / 3])
def test_sparse_plus_lowrank_forward_and_dense_weight(scale):
    layer = slr_layer(scale=scale)
    W = scale * layer.B @ layer.A
    for k, (i, v) in enumerate(zip(layer.idx.tolist(), layer.val.tolist())):
        W[i // 10, i % 10] += v  # S by hand from the flat row-major indices
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer.dense_weight(), W)
        torch.testing.assert_close(layer(x), x @ W.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_sparse_plus_lowrank_bytes_and_validation():
    layer = slr_layer(out_f=12, in_f=10, r=3, nnz=17)
    assert layer.idx.dtype == torch.int32
    assert layer.stored_bytes() == 3 * 10 * 4 + 12 * 3 * 4 + 17 * 4 + 17 * 4  # A + B + int32 idx + values = 400
    assert slr_layer(scale=2.0).stored_bytes() == 404  # + the scale constant of the exported Mul
    assert layer.describe() == {"kind": "sparse_lowrank", "in": 10, "out": 12, "rank": 3, "nnz": 17,
                                "density": round(17 / 120, 5), "index_dtype": "int32", "custom_op": "SparseMatMul"}
    A, B = torch.zeros(2, 4), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="sorted"):
        SparsePlusLowRankLinear(A, B, torch.tensor([3, 1]), torch.zeros(2))
    with pytest.raises(ValueError, match="range"):
        SparsePlusLowRankLinear(A, B, torch.tensor([1, 12]), torch.zeros(2))


@pytest.mark.parametrize("gamma", [0.5, 0.3])
def test_channel_sparse_forward_and_dense_weight(gamma):
    layer = csl_layer(gamma=gamma)
    W = gamma * layer.B @ layer.A
    for j, ch in enumerate(layer.channels.tolist()):
        W[:, ch] += (1 - gamma) * layer.Ws[:, j]
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer.dense_weight(), W)
        torch.testing.assert_close(layer(x), x @ W.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_channel_sparse_bytes_and_validation():
    layer = csl_layer(out_f=12, in_f=10, r=3, c=4)
    assert layer.stored_bytes() == 3 * 10 * 4 + 12 * 3 * 4 + 4 * 8 + 12 * 4 * 4 + 4  # = 492 (gamma = 1 - gamma)
    assert csl_layer(out_f=12, in_f=10, r=3, c=4, gamma=0.3).stored_bytes() == 496  # two scalar constants
    with pytest.raises(ValueError, match="gamma"):
        ChannelSparseLowRankLinear(torch.zeros(2, 4), torch.zeros(3, 2), torch.tensor([0]), torch.zeros(3, 1), gamma=1.0)
    with pytest.raises(ValueError, match="Ws"):
        ChannelSparseLowRankLinear(torch.zeros(2, 4), torch.zeros(3, 2), torch.tensor([0, 1]), torch.zeros(3, 1))


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix


def test_support_lstsq_matches_per_row_brute_force():
    X = _inputs(200, 16, 1)
    G = X.T @ X
    R = torch.randn(9, 16, generator=_gen(2), dtype=torch.float64)
    idx = random_support(9, 16, 30, _gen(3))
    val = support_lstsq(R, G, idx, chunk=4)  # several chunks, rows with different counts
    for o in range(9):
        sel = (idx // 16) == o
        cols = (idx[sel] % 16).long()
        if not len(cols):
            continue
        # min_s ||X r_o - X[:, J] s|| by ordinary least squares on the activations
        s = torch.linalg.lstsq(X[:, cols], X @ R[o], driver="gelsd").solution
        torch.testing.assert_close(val[sel], s, rtol=1e-7, atol=1e-9)


def test_channel_lstsq_matches_brute_force():
    X = _inputs(200, 16, 4)
    R = torch.randn(9, 16, generator=_gen(5), dtype=torch.float64)
    I = torch.tensor([1, 4, 9])
    Ws = channel_lstsq(R, X.T @ X, I)
    ref = torch.linalg.lstsq(X[:, I], X @ R.T, driver="gelsd").solution.T
    torch.testing.assert_close(Ws, ref, rtol=1e-7, atol=1e-9)


def _fit_vs_lowrank(W, X, sparse_bytes, step_factory, iters=3):
    """(sparse + low-rank error, whitened SVD error) at equal bytes, both ||X (W - W_hat)^T|| / ||X W^T||."""
    out_f, in_f = W.shape
    ratio = 0.5
    G = X.T @ X
    L = gram_factor(G)
    r = rank_after_extra(out_f, in_f, ratio, sparse_bytes)
    fit = alternate(W, L, r, step_factory(damped_gram(L)), iters)
    r_ref = uniform_rank(out_f, in_f, ratio)
    ref = whitened_svd(W, L, r_ref)
    base = float((X @ W.T).norm())
    err_ref = float((X @ (W - ref.B @ ref.A).T).norm()) / base
    assert all(b <= a + 1e-9 for a, b in zip(fit.rel_errors, fit.rel_errors[1:])), fit.rel_errors  # monotone
    return fit, err_ref


def test_sltrain_fit_beats_lowrank_at_equal_bytes_on_sparse_structure():
    """W = low-rank + 3% large sparse spikes: whitened SVD wastes its rank on the spikes."""
    out_f, in_f, nnz = 64, 48, 92
    g = _gen(6)
    spikes = torch.zeros(out_f * in_f, dtype=torch.float64)
    spikes[torch.randperm(out_f * in_f, generator=g)[:nnz]] = 5 * torch.randn(nnz, generator=g, dtype=torch.float64)
    W = torch.randn(out_f, 4, generator=g, dtype=torch.float64) @ torch.randn(4, in_f, generator=g, dtype=torch.float64)
    W = W + spikes.view(out_f, in_f)
    X = _inputs(300, in_f, 7)

    def largest(G):
        sup = []

        def step(R):
            if not sup:
                sup.append(largest_support(R, G, nnz))
            v = support_lstsq(R, G, sup[0])
            return torch.zeros(out_f * in_f, dtype=R.dtype).index_put_((sup[0],), v).view(out_f, in_f), (sup[0], v)
        return step

    fit, err_ref = _fit_vs_lowrank(W, X, nnz * 8, largest)
    L = gram_factor(X.T @ X)
    base = float((X @ W.T).norm())
    idx, val = fit.payload
    S = torch.zeros(out_f * in_f, dtype=torch.float64).index_put_((idx,), val).view(out_f, in_f)
    err = float((X @ (W - fit.B @ fit.A - S).T).norm()) / base
    assert err == pytest.approx(fit.rel_errors[-1], rel=1e-3)  # the reported error is the real one (damping ~1e-6)
    assert err < 0.6 * err_ref, (err, err_ref)


def test_lost_fit_beats_lowrank_at_equal_bytes_on_channel_structure():
    """W = rank 10 + 6 input channels carrying unrelated weights (outlier channels), smaller than the
    low-rank part: whitened SVD at equal bytes (rank 13) cannot hold both, LOST (rank 10 + 6 channels) can."""
    out_f, in_f, c = 64, 48, 6
    g = _gen(8)
    W = torch.randn(out_f, 10, generator=g, dtype=torch.float64) @ torch.randn(10, in_f, generator=g, dtype=torch.float64)
    hot = torch.tensor([5, 11, 17, 23, 30, 41])
    W[:, hot] += 0.5 * torch.randn(out_f, c, generator=g, dtype=torch.float64)
    X = torch.randn(300, in_f, generator=_gen(9), dtype=torch.float64)

    def channels(G):
        chosen = []

        def step(R):
            if not chosen:
                chosen.append(worst_channels(R, G, c))
            Ws = channel_lstsq(R, G, chosen[0])
            return torch.zeros_like(R).index_copy_(1, chosen[0], Ws), (chosen[0], Ws)
        return step

    fit, err_ref = _fit_vs_lowrank(W, X, c * out_f * 4 + c * 8 + 8, channels)
    assert sorted(fit.payload[0].tolist()) == hot.tolist()
    assert fit.rel_errors[-1] < 0.2 * err_ref, (fit.rel_errors, err_ref)  # and converging towards 0


@pytest.mark.parametrize("method,opts", [("sltrain", {"delta": 0.03, "support": "random"}),
                                         ("sltrain", {"delta": 0.03, "support": "largest"}),
                                         ("lost", {"channel_frac": 0.05, "gamma": 0.5})])
def test_methods_respect_the_budget_and_match_forward(minilm, minilm_calib, method, opts):
    model = copy.deepcopy(minilm.model)
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
               "encoder.layer.0.output.dense"]
    ratio = 0.5
    res = get_method(method).compress(model, targets, CompressContext(ratio=ratio, options=opts, calibration=minilm_calib))
    kinds = {"sltrain": SparsePlusLowRankLinear, "lost": ChannelSparseLowRankLinear}
    for rec in res.layers:
        layer = model.get_submodule(rec.name)
        assert isinstance(layer, kinds[method])
        assert rec.bytes_after == layer_bytes(layer) <= (1 - ratio) * rec.bytes_before
        # the rank filled the budget: one more rank would not fit
        assert rec.bytes_after + (layer.in_features + layer.out_features) * 4 > (1 - ratio) * rec.bytes_before
        x = torch.randn(2, 3, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=1e-4, atol=1e-4)
        # the reported calibration error is the layer's real output error on the calibration Gram
        W0 = minilm.model.get_submodule(rec.name).weight.detach().double()
        G = minilm_calib.grams(minilm.model, [rec.name])[rec.name]
        real = output_error(W0, layer.dense_weight().double(), G) / output_error(W0, torch.zeros_like(W0), G)
        assert real == pytest.approx(rec.metrics["calib_rel_error"], rel=1e-3)
        errs = rec.metrics["error_per_iter"]
        assert errs[-1] <= errs[0] and len(errs) == 4
        # same ballpark as whitened SVD at equal bytes (measured: 0.94-1.10x on MiniLM layers)
        assert rec.metrics["calib_rel_error"] < 1.25 * rec.metrics["svd_calib_rel_error"], rec.metrics
    if method == "sltrain":
        d = res.layers[0].after
        assert d["nnz"] == round(0.03 * 384 * 384)


@pytest.mark.parametrize("gamma", [0.5, 0.3])
def test_lost_exports_as_gather_and_matmul_and_folding_keeps_it_compressed(tmp_path, gamma):
    """LOST's channel part is standard ONNX (Gather on the input channels + MatMul, no plugin node);
    after the ORT pipeline (constant folding included) the file holds A, B, W_s and I - never a dense W."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from factordeploy.passes.annotate import factorized_nodes
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline

    layer = csl_layer(out_f=48, in_f=40, r=5, c=3, gamma=gamma)

    raw = export_layer(layer)
    proto = run_pipeline(raw, ort_pipeline(), PassContext(layers={"l": layer.describe()}))
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # standard ops only
    nodes = factorized_nodes(proto)["l"]
    assert sorted(n.op_type for n in nodes if n.op_type in ("MatMul", "Gather")) == ["Gather", "MatMul", "MatMul", "MatMul"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    gather = next(n for n in nodes if n.op_type == "Gather")
    assert gather.input[0] == "x" and inits[gather.input[1]].tolist() == layer.channels.tolist()
    big = sorted(a.shape for a in inits.values() if a.size > 8)
    assert big == sorted([(40, 5), (5, 48), (3, 48), (48,)])  # A^T, B^T, W_s^T, bias: no (40, 48)
    stored = sum(a.nbytes for n, a in inits.items() if n != "l.bias")
    assert stored == layer.stored_bytes()  # the counted bytes are the bytes on disk
    onnx.save(proto, str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 7, 40)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], Wrap(layer)(x).numpy(), rtol=1e-5, atol=1e-4)


def test_support_lstsq_bounds_its_batch_memory():
    """A support piled into one row (kmax 40) with a tiny element budget: one row per batch, same answer."""
    X = _inputs(200, 48, 10)
    G = X.T @ X
    R = torch.randn(6, 48, generator=_gen(11), dtype=torch.float64)
    idx = torch.cat([torch.arange(0, 40), 48 + torch.tensor([3, 9]), 5 * 48 + torch.tensor([1])])
    torch.testing.assert_close(support_lstsq(R, G, idx, max_elems=1600), support_lstsq(R, G, idx), rtol=1e-9, atol=1e-12)
    s = torch.linalg.lstsq(X[:, :40], X @ R[0], driver="gelsd").solution
    torch.testing.assert_close(support_lstsq(R, G, idx, max_elems=1600)[:40], s, rtol=1e-7, atol=1e-9)
