"""Block-wise compression (issue 21): --calib-mode sequential and --reconstruct-steps, on tiny real
transformers models (random weights, real tokenizers), against hand-computed references."""

from __future__ import annotations

import copy

import pytest
import torch

from factordeploy.compress.base import CompressContext, get_method, method_options
from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.compress.layers import LowRankLinear, Sparse24Linear, SparseDictLinear
from factordeploy.compress.linalg import refit_left
from factordeploy.compress.sequential import compress_blockwise, find_blocks
from factordeploy.compress.targets import DEFAULT_EXCLUDE, find_targets
from factordeploy.errors import UserError
from factordeploy.models.registry import load_model
from factordeploy.recover.blockwise import BlockwiseConfig, ReconstructConfig, Reconstructor, check_blockwise
from factordeploy.train import TrainHooks


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    calib = Calibration(loaded, CalibrationConfig(n=8, length=32, seed=0, batch_size=4))
    return loaded, calib, find_targets(loaded.model, ("*",), DEFAULT_EXCLUDE)


def _ctx(method: str, calib, opts=None, ratio=0.5) -> CompressContext:
    return CompressContext(ratio=ratio, options=method_options(method, opts or {}), calibration=calib)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sequential_calibration_equals_hand_computed(tiny):
    """Block 1's Grams come from the model whose block 0 is already compressed: compress block 0 on the
    original statistics, then collect block 1's Grams with a full forward of that half-compressed model
    (an independent path: Calibration's whole-model hooks), compress block 1 with them; the sequential
    driver must give the same factors, and differ from original-statistics calibration."""
    loaded, calib, targets = tiny
    blocks = find_blocks(loaded.model, targets)
    assert blocks.prefix == "model.layers" and sorted(blocks.targets) == [0, 1] and not blocks.outside
    b0, b1 = blocks.targets[0], blocks.targets[1]
    method = get_method("svd-whiten")

    seq = copy.deepcopy(loaded.model)
    compress_blockwise(method, seq, targets, _ctx("svd-whiten", calib), "sequential")

    hand = copy.deepcopy(loaded.model)
    fresh = Calibration(loaded, calib.config)  # its own cache: statistics of the model it is given
    method.compress(hand, b0, _ctx("svd-whiten", fresh))
    half = Calibration(loaded, calib.config)
    G1 = half.grams(hand, b1)  # block 1's inputs after the compressed block 0
    G1_orig = fresh.grams(loaded.model, b1)
    assert not torch.allclose(G1[b1[0]], G1_orig[b1[0]], rtol=1e-3)  # the prefix's errors are visible
    method.compress(hand, b1, _ctx("svd-whiten", half))

    orig = copy.deepcopy(loaded.model)
    method.compress(orig, targets, _ctx("svd-whiten", Calibration(loaded, calib.config)))
    for n in targets:
        a, h, o = seq.get_submodule(n), hand.get_submodule(n), orig.get_submodule(n)
        assert isinstance(a, LowRankLinear)
        torch.testing.assert_close(a.dense_weight(), h.dense_weight(), rtol=1e-4, atol=1e-6)
        if n in b0:  # the first block sees the original inputs in both modes
            torch.testing.assert_close(a.dense_weight(), o.dense_weight(), rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(seq.get_submodule(n).dense_weight(), orig.get_submodule(n).dense_weight(),
                                  rtol=1e-3, atol=1e-5) for n in b1)


@pytest.mark.parametrize("method,opts", [("svd-whiten", {}), ("sparse24", {"score": "sparsegpt"}), ("cospadi", {})])
def test_reconstruction_with_zero_steps_is_bit_identical(tiny, method, opts):
    loaded, calib, targets = tiny
    m = get_method(method)
    ref = copy.deepcopy(loaded.model)
    m.compress(ref, targets, _ctx(method, calib, opts))
    got = copy.deepcopy(loaded.model)
    res = compress_blockwise(m, got, targets, _ctx(method, calib, opts), "original", Reconstructor(ReconstructConfig(steps=0)))
    assert [u["steps"] for u in res.extra["blockwise"]["reconstruction"]] == [0, 0]
    a, b = _state(ref), _state(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,opts,kind", [("svd-whiten", {}, LowRankLinear), ("svd", {}, LowRankLinear),
                                              ("sparse24", {"score": "sparsegpt"}, Sparse24Linear),
                                              ("cospadi", {}, SparseDictLinear)])
def test_reconstruction_never_increases_calibration_error(tiny, method, opts, kind):
    """Good settings lower every unit's calibration error (closed form, then steps); a learning rate
    that wrecks the factors (lr 3.0) must still leave no unit worse than it started."""
    loaded, calib, targets = tiny
    m = get_method(method)
    for lr, must_improve in ((1e-3, True), (3.0, False)):
        model = copy.deepcopy(loaded.model)
        res = compress_blockwise(m, model, targets, _ctx(method, calib, opts), "sequential",
                                 Reconstructor(ReconstructConfig(steps=8, lr=lr, eval_every=2)))
        units = res.extra["blockwise"]["reconstruction"]
        assert len(units) == 2
        for u in units:
            assert u["error_end"] <= u["error_closed_form"] <= u["error_start"]
            if must_improve:
                assert u["error_end"] < 0.9 * u["error_start"]
        if not must_improve:  # the guard was exercised: some evaluation during training was worse than the start
            assert any(v > u["eval_curve"][0][1] for u in units for _, v in u["eval_curve"])
        assert all(isinstance(model.get_submodule(n), kind) for n in targets)
        if kind is Sparse24Linear:  # the 2:4 pattern survived the refit and the steps
            for n in targets:
                w = model.get_submodule(n).weight.detach().reshape(-1, 4)
                assert int((w != 0).sum(1).max()) <= 2


def test_reconstruction_resume_after_kill_reproduces_uninterrupted_run(tiny, tmp_path):
    loaded, calib, targets = tiny
    m = get_method("svd-whiten")
    cfg = ReconstructConfig(steps=6, lr=1e-3, eval_every=2)

    full = copy.deepcopy(loaded.model)
    compress_blockwise(m, full, targets, _ctx("svd-whiten", calib), "sequential", Reconstructor(cfg))

    class Killed(Exception):
        pass

    calls = [0]

    def kill(step: int) -> None:
        calls[0] += 1
        if calls[0] == 6 + 3:  # unit 1, after its 3rd step (its checkpoint is at step 2)
            raise Killed

    ck = ReconstructConfig(steps=6, lr=1e-3, eval_every=2, checkpoint=str(tmp_path / "ck"))
    with pytest.raises(Killed):
        compress_blockwise(m, copy.deepcopy(loaded.model), targets, _ctx("svd-whiten", calib), "sequential",
                           Reconstructor(ck, hooks=TrainHooks(after_step=kill)))
    assert (tmp_path / "ck" / "unit0" / "trainer.pt").exists() and (tmp_path / "ck" / "unit1" / "trainer.pt").exists()
    resumed = copy.deepcopy(loaded.model)
    steps_run = [0]
    count = TrainHooks(after_step=lambda step: steps_run.__setitem__(0, steps_run[0] + 1))
    compress_blockwise(m, resumed, targets, _ctx("svd-whiten", calib), "sequential", Reconstructor(ck, hooks=count))
    assert steps_run[0] == 6 - 2  # unit 0 finished, unit 1 resumed from its step-2 checkpoint
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refit_left_is_least_squares_on_other_inputs():
    """B from the normal equations equals torch.linalg.lstsq on the explicit activations."""
    g = torch.Generator().manual_seed(0)
    Xs, Xo = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(200, 12, generator=g, dtype=torch.float64)
    W, A = torch.randn(7, 12, generator=g, dtype=torch.float64), torch.randn(3, 12, generator=g, dtype=torch.float64)
    B = refit_left(W, A, Xs.T @ Xs, Xs.T @ Xo)
    ref = torch.linalg.lstsq(Xs @ A.T, Xo @ W.T).solution.T
    torch.testing.assert_close(B, ref)


def test_bad_blockwise_input_is_one_named_error():
    with pytest.raises(UserError, match="fits all its layers jointly"):
        check_blockwise(BlockwiseConfig("sequential"), get_method("dsformer"), {})
    with pytest.raises(UserError, match="uses no calibration"):
        check_blockwise(BlockwiseConfig("sequential"), get_method("svd"), {})
    with pytest.raises(UserError, match="reconstruct-mix"):
        check_blockwise(BlockwiseConfig("original", ReconstructConfig(steps=1, mix=2.0)), get_method("svd"), {})
    check_blockwise(BlockwiseConfig("auto", ReconstructConfig(steps=5)), get_method("svd"), {})  # every method reconstructs


@pytest.mark.parametrize("method", ["svd", "svd-whiten"])
def test_measured_error_curve_equals_output_error_of_the_factors(tiny, method):
    """error_curve[r] is the relative calibration output error of the method's own rank-r factors."""
    from factordeploy.compress.linalg import output_error

    loaded, calib, targets = tiny
    m = get_method(method)
    ctx = _ctx(method, calib, {"allocation": "measured"})
    m.prepare(loaded.model, targets, ctx)
    name = targets[3]
    W = loaded.model.get_submodule(name).weight.detach()
    G = calib.grams(loaded.model, [name])[name]
    curve = m.error_curve(name, W, G)
    ref0 = output_error(W, torch.zeros_like(W), G) ** 2
    for r in (1, 5, 20):
        f = m.factor(name, W, r)
        got = output_error(W.double(), (f.B.double() @ f.A.double()), G) ** 2 / ref0
        assert abs(float(curve[r]) - got) < 1e-3 * max(got, 1e-6) + 1e-7, (r, float(curve[r]), got)
    assert float(curve[0]) == pytest.approx(1.0) and float(curve[-1]) == pytest.approx(0.0, abs=1e-9)


def test_measured_allocation_meets_budget_and_beats_uniform_on_its_objective():
    from factordeploy.compress.budget import allocate_by_error, lowrank_bytes, uniform_rank

    shapes = {"fast": (64, 64), "slow": (64, 64)}
    r = torch.arange(0, 65, dtype=torch.float64)
    curves = {"fast": torch.exp(-r / 2), "slow": 1 - r / 64}
    a = allocate_by_error(curves, shapes, 0.5)
    assert a.bytes_after <= a.bytes_budget
    u = uniform_rank(64, 64, 0.5)
    assert sum(lowrank_bytes(64, 64, u) for _ in shapes) <= a.bytes_budget
    uniform_err = float(curves["fast"][u] + curves["slow"][u])
    assert a.error < uniform_err and a.ranks["slow"] > u > a.ranks["fast"] > 0
