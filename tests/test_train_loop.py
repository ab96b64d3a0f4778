"""The one training loop: schedule, keep-best, safe checkpoints, resume == uninterrupted run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from factordeploy.errors import UserError
from factordeploy.train import TrainConfig, TrainHooks, train
from factordeploy.train.loop import lr_lambda


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    W = torch.randn(4, 8, generator=g)
    batches = []
    for _ in range(5):
        x = torch.randn(6, 8, generator=g)
        batches.append({"x": x, "y": x @ W.T})

    def loss_fn(m, b):
        # torch.randn inside the step: resume must restore the RNG too
        noise = 0.01 * torch.randn(b["y"].shape)
        return ((m(b["x"]) - b["y"] - noise) ** 2).mean()

    held = batches[0]

    def eval_fn(m):
        return float(((m(held["x"]) - held["y"]) ** 2).mean())

    return model, batches, loss_fn, eval_fn


def test_warmup_then_cosine():
    f = lr_lambda(TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)


def test_training_reduces_loss_and_records_everything():
    model, batches, loss_fn, eval_fn = _problem()
    cfg = TrainConfig(steps=30, lr=3e-2, eval_every=10, accumulate=2, grad_clip=1.0)
    res = train(model, list(model.parameters()), loss_fn, batches, cfg, eval_fn)
    assert len(res.losses) == 30
    assert [s for s, _ in res.eval_curve] == [0, 10, 20, 30]
    assert res.eval_curve[-1][1] < 0.5 * res.eval_curve[0][1]
    assert res.peak_memory_bytes > 0 and res.seconds > 0


def test_keep_best_restores_best_state():
    model, batches, loss_fn, _ = _problem()
    calls = []

    def eval_fn(m):  # evaluations at steps 0, 1, 2, ...: the 2nd (step 1) is the best by construction
        calls.append(1)
        return abs(len(calls) - 2) + 0.5

    snap = {}

    def after_step(step):
        if step + 1 == 1:
            snap["p"] = [p.detach().clone() for p in model.parameters()]

    res = train(model, list(model.parameters()), loss_fn, batches,
                TrainConfig(steps=5, lr=1e-2, eval_every=1), eval_fn, TrainHooks(after_step=after_step))
    assert (res.best_step, res.best_eval) == (1, 0.5)
    for p, q in zip(model.parameters(), snap["p"]):
        assert torch.equal(p, q)


def _run(tmp, steps, kill_after=None):
    model, batches, loss_fn, eval_fn = _problem()

    def after_step(step):
        if kill_after is not None and step + 1 == kill_after:
            raise KeyboardInterrupt("simulated kill")

    cfg = TrainConfig(steps=steps, lr=1e-2, eval_every=3, save_every=2, checkpoint=str(tmp), accumulate=2, seed=3)
    res = train(model, list(model.parameters()), loss_fn, batches, cfg, eval_fn, TrainHooks(after_step=after_step))
    return model, res


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    ref_model, ref = _run(tmp_path / "a", 9)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", 9, kill_after=5)  # last checkpoint: step 4
    model, res = _run(tmp_path / "b", 9)
    assert res.start_step == 4
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert res.losses == ref.losses
    assert res.eval_curve == ref.eval_curve


def test_checkpoint_of_another_run_is_refused(tmp_path):
    model, batches, loss_fn, _ = _problem()
    train(model, list(model.parameters()), loss_fn, batches, TrainConfig(steps=2, checkpoint=str(tmp_path)))
    with pytest.raises(UserError, match="different run"):
        train(model, list(model.parameters()), loss_fn, batches, TrainConfig(steps=2, lr=5e-3, checkpoint=str(tmp_path)))
    (tmp_path / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        train(model, list(model.parameters()), loss_fn, batches, TrainConfig(steps=2, checkpoint=str(tmp_path)))
