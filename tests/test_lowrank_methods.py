"""Data-aware low-rank methods: the math identities they rest on, and their behaviour on MiniLM."""

from __future__ import annotations

import copy

import pytest
import torch

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.budget import allocate_by_threshold, lowrank_bytes, uniform_rank
from factordeploy.compress.layers import LowRankLinear
from factordeploy.compress.linalg import gram_factor, output_error, row_weighted_svd, truncated_svd, whitened_svd


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_whitening_identity_synthetic():
    """||X (W - BA)^T|| equals the norm of the discarded singular values of W L (L L^T = X^T X)."""
    X = _correlated_inputs(400, 48, seed=1)
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G = X.T @ X
    L = gram_factor(G, damp=1e-14)
    for rank in (4, 12, 24):
        f = whitened_svd(W, L, rank)
        direct = float(torch.linalg.norm(X @ (W - f.B @ f.A).T))
        assert direct == pytest.approx(float(f.dropped.norm()), rel=1e-6)
        assert output_error(W, f.B @ f.A, G) == pytest.approx(direct, rel=1e-6)
        # and it is strictly better on X than the weight-space optimum at the same rank
        p = truncated_svd(W, rank)
        assert direct < float(torch.linalg.norm(X @ (W - p.B @ p.A).T))


def test_fisher_weighting_reduces_to_svd_with_equal_rows():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plain = truncated_svd(W, 7)
    for c in (1.0, 3.7e-4):
        fw = row_weighted_svd(W, torch.full((40,), c, dtype=torch.float64), 7)
        torch.testing.assert_close(fw.B @ fw.A, plain.B @ plain.A, rtol=1e-9, atol=1e-9)


def test_fisher_weighting_prefers_important_rows():
    """With unequal row weights, the weighted error beats plain SVD's (what FWSVD optimises)."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    w = torch.rand(40, generator=g, dtype=torch.float64) ** 4 + 1e-5
    fw, plain = row_weighted_svd(W, w, 6), truncated_svd(W, 6)

    def werr(f):
        return float((w[:, None] * (W - f.B @ f.A) ** 2).sum())

    assert werr(fw) < werr(plain)


def _spectra(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (384, 384), "b": (1536, 384), "c": (384, 1536), "d": (576, 192), "e": (100, 300)}
    spectra = {}
    for n, (o, i) in shapes.items():
        k = min(o, i)
        decay = float(torch.rand(1, generator=g)) * 8 + 0.5
        spectra[n] = torch.exp(-decay * torch.linspace(0, 1, k, dtype=torch.float64)) + 0.01 * torch.rand(k, generator=g, dtype=torch.float64)
        spectra[n] = spectra[n].sort(descending=True).values
    return spectra, shapes


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_bisection_hits_budget_within_one_rank_step_per_layer(ratio, seed):
    spectra, shapes = _spectra(seed)
    alloc = allocate_by_threshold(spectra, shapes, ratio)
    dense = sum(o * i * 4 for o, i in shapes.values())
    assert alloc.bytes_budget == int((1 - ratio) * dense)
    assert alloc.bytes_after <= alloc.bytes_budget
    recount = sum(lowrank_bytes(o, i, alloc.ranks[n]) if alloc.ranks[n] else o * i * 4 for n, (o, i) in shapes.items())
    assert recount == alloc.bytes_after
    one_step_each = sum((o + i) * 4 for o, i in shapes.values())
    assert alloc.bytes_budget - alloc.bytes_after <= one_step_each


def test_min_reduction_split():
    spectra, shapes = _spectra(5)
    for mr in (0.0, 0.5, 0.8):
        alloc = allocate_by_threshold(spectra, shapes, 0.3, min_reduction=mr)
        assert alloc.bytes_after <= alloc.bytes_budget
        for n, k in alloc.ranks.items():
            if k:  # LRC
                assert 1 - k / min(shapes[n]) >= mr


# ---- real model (MiniLM) -------------------------------------------------------------------

LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.2.intermediate.dense", "encoder.layer.5.output.dense"]


@pytest.mark.slow
def test_svd_whiten_beats_svd_on_minilm_calibration_grams(minilm, minilm_calib):
    grams = minilm_calib.grams(minilm.model, LAYERS)
    for name in LAYERS:
        W = minilm.model.get_submodule(name).weight.detach().double()
        r = uniform_rank(*W.shape, 0.5)
        L = gram_factor(grams[name])
        white, plain = whitened_svd(W, L, r), truncated_svd(W, r)
        e_white = output_error(W, white.B.double() @ white.A.double(), grams[name])
        e_plain = output_error(W, plain.B.double() @ plain.A.double(), grams[name])
        assert e_white <= e_plain * (1 + 1e-9)
        assert e_white < 0.95 * e_plain  # real activations are far from isotropic


def _compress(loaded, calib, method, ratio, **opts):
    model = copy.deepcopy(loaded.model)
    m = get_method(method)
    options = {o.key: o.default for o in m.options} | opts
    ctx = CompressContext(ratio=ratio, options=options, calibration=calib)
    return model, m.compress(model, [n for n in LAYERS], ctx)


@pytest.mark.slow
def test_welore_split_balance_and_budget(minilm, minilm_calib):
    model, res = _compress(minilm, minilm_calib, "welore", 0.4)
    assert res.bytes_after <= 0.6 * res.bytes_before
    split, table = res.extra["split"], res.extra["rank_table"]
    assert split["lrc"] + split["nlrc"] == len(LAYERS) == len(table)
    for row in table:
        if row["component"] == "LRC":
            assert row["rank_reduction"] >= 0.5
            layer = model.get_submodule(row["layer"])
            assert isinstance(layer, LowRankLinear)
            # balanced factors: B = U sqrt(S), A = sqrt(S) V^T  =>  B^T B = A A^T = S
            torch.testing.assert_close(layer.B.T @ layer.B, layer.A @ layer.A.T, rtol=1e-3, atol=1e-4)
        else:
            assert isinstance(model.get_submodule(row["layer"]), torch.nn.Linear)


@pytest.mark.slow
def test_fwsvd_and_whiten_run_with_welore_allocation(minilm, minilm_calib):
    for method in ("svd-whiten", "fwsvd"):
        _, res = _compress(minilm, minilm_calib, method, 0.4, allocation="welore")
        assert res.bytes_after <= 0.6 * res.bytes_before
        assert any("welore allocation" in n for n in res.notes)
        assert all("weight_rel_error" in r.metrics for r in res.layers if r.after["kind"] == "lowrank")


@pytest.mark.slow
def test_recovery_with_adapter_none_trains_only_the_lowrank_factors(minilm):
    """WeLore's LRC-only tuning is the recovery stage with --adapter none (it replaced --finetune-steps):
    only the LowRankLinear factors move, and the held-out distillation loss drops."""
    from factordeploy.recover import RecoveryConfig, capture_teacher, recover

    model = copy.deepcopy(minilm.model)
    cfg = RecoveryConfig(steps=12, adapter="none", lr=3e-4, data="wiki", samples=16, seq_len=64, batch=4,
                         eval_windows=4, eval_every=6)
    teacher = capture_teacher(minilm, model, cfg)
    m = get_method("welore")
    m.compress(model, list(LAYERS), CompressContext(ratio=0.5, options={"min_reduction": 0.5}))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith((".A", ".B"))}
    rep = recover(minilm, model, teacher, cfg)
    curve = rep.train["eval_curve"]
    assert curve[0][1] > 1e-4 and rep.train["best_eval"] < 0.97 * curve[0][1]  # held-out pydoc: 0.316 -> 0.295
    assert rep.train["losses"][-1] < 0.85 * rep.train["losses"][0]
    assert rep.adapter["factors_by_layer_kind"] == {"lowrank": 2 * sum(
        1 for r in model.modules() if type(r).__name__ == "LowRankLinear")}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not any(p.requires_grad for p in model.parameters())


def test_balance_keeps_the_product_and_equalises_the_factors():
    """Whitened factors are badly scaled (A ~1e-3, B ~10); balancing must not change B @ A."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(6, 20, generator=g) * 1e-3
    B = torch.randn(12, 6, generator=g) * 10
    A[2] = 0.0  # a dead component stays as it is
    layer = LowRankLinear(A, B)
    before = layer.dense_weight().detach().clone()
    layer.balance_()
    torch.testing.assert_close(layer.dense_weight().detach(), before, rtol=1e-5, atol=1e-6)
    a, b = layer.A.detach().norm(dim=1), layer.B.detach().norm(dim=0)
    live = a > 0
    torch.testing.assert_close(a[live], b[live], rtol=1e-5, atol=0)
    assert torch.equal(layer.B.detach()[:, 2], B[:, 2])


def test_hidden_distillation_is_the_relative_token_error():
    from factordeploy.compress.objective import hidden_distillation

    g = torch.Generator().manual_seed(6)
    t = torch.randn(2, 5, 8, generator=g)
    assert float(hidden_distillation(t, t)) == 0.0
    assert float(hidden_distillation(1.5 * t, t)) == pytest.approx(0.25, rel=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h = t.clone()
    h[0, 3:] += 100.0  # padding positions must not count
    assert float(hidden_distillation(h, t, mask)) == 0.0
    # unmasked form == dsformer's original MSE / mean square
    h = t + 0.1 * torch.randn(2, 5, 8, generator=g)
    ref = torch.nn.functional.mse_loss(h, t) / t.pow(2).mean()
    assert float(hidden_distillation(h, t)) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.slow
def test_token_objective_is_zero_at_the_original_encoder(minilm, minilm_calib):
    from factordeploy.compress.objective import TaskObjective

    model = copy.deepcopy(minilm.model)
    obj = TaskObjective(minilm_calib, model, encoder_target="tokens")
    batch = next(iter(minilm_calib.batches()))
    assert float(obj.loss(model, 0, batch).detach()) == pytest.approx(0.0, abs=1e-10)
    assert "every token" in obj.description
