"""Recovery: adapters merge exactly into every layer kind, GGPO leaves frozen weights bit-identical,
distillation is zero at the teacher, and a bad --recover-data fails before any compression work."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from factordeploy.compress.layers import (ChannelSparseLowRankLinear, DenseSparseLinear, LowRankLinear, Sparse24Linear,
                                          SparseDictLinear, SparsePlusLowRankLinear, project_24, violations_24)
from factordeploy.recover import AdapterConfig, RecoveryConfig, attach, capture_teacher, recover
from factordeploy.recover.stage import distill_loss


class Stack(nn.Module):
    """One layer of every kind (two SparseDictLinears share one dictionary) plus a dense linear."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        D = nn.Parameter(r(12, 16))
        self.layers = nn.ModuleList([
            LowRankLinear(r(6, 16), r(16, 6), r(16)),
            Sparse24Linear(project_24(r(16, 16)), r(16)),
            DenseSparseLinear(r(16, 8), project_24(r(8, 16)), r(16)),
            SparseDictLinear(D, torch.randint(0, 12, (3, 16), generator=g), r(3, 16), r(16), shared=2, group="g"),
            SparseDictLinear(D, torch.randint(0, 12, (3, 16), generator=g), r(3, 16), None, shared=2, group="g"),
            nn.Linear(16, 16),
            SparsePlusLowRankLinear(r(3, 16), r(16, 3), torch.randperm(256, generator=g)[:20].sort().values, r(20), r(16)),
            ChannelSparseLowRankLinear(r(3, 16), r(16, 3), torch.tensor([2, 7, 11]), r(16, 3), r(16), gamma=0.4),
        ])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _snapshot(model):
    out = []
    for m in model.layers:
        d = {"kind": type(m).__name__}
        if hasattr(m, "stored_bytes"):
            d["bytes"] = m.stored_bytes()
        if isinstance(m, Sparse24Linear):
            d["mask"] = (m.weight != 0).clone()
        if isinstance(m, DenseSparseLinear):
            d["mask"] = (m.S != 0).clone()
        if isinstance(m, (SparseDictLinear, SparsePlusLowRankLinear)):
            d["idx"] = m.idx.clone()
        if isinstance(m, ChannelSparseLowRankLinear):
            d["idx"] = m.channels.clone()
        out.append(d)
    return out


@pytest.mark.parametrize("kind", ["lora", "lora-ggpo", "wara"])
def test_adapter_merge_is_exact_for_every_layer_kind(kind):
    model = Stack()
    before = _snapshot(model)
    aset = attach(model, AdapterConfig(kind, rank=4, include_dense=True))
    assert aset.describe()["factors_by_layer_kind"] == {"lowrank": 2, "sparse24": 1, "densesparse": 2,
                                                        "sparse_dict": 3, "dense": 1,
                                                        "sparse_lowrank": 3, "channel_lowrank": 3}  # shared D once
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(5, 16, generator=g)
    with torch.no_grad():
        y_adapter = model(x)
        y_plain_before = Stack()(x)
    assert not torch.allclose(y_adapter, y_plain_before, atol=1e-3)  # the adapters do change the model
    aset.merge()
    with torch.no_grad():
        y_merged = model(x)
    torch.testing.assert_close(y_merged, y_adapter, atol=1e-5, rtol=1e-5)
    after = _snapshot(model)
    for b, a in zip(before, after):
        assert b["kind"] == a["kind"] and b.get("bytes") == a.get("bytes")
        if "mask" in b:  # the 2:4 pattern: same kept positions (the update lives on the mask)
            assert torch.equal(b["mask"], a["mask"])
        if "idx" in b:
            assert torch.equal(b["idx"], a["idx"])
    assert violations_24(model.layers[1].weight) == 0 and violations_24(model.layers[2].S) == 0
    assert model.layers[3].D is model.layers[4].D  # still one shared dictionary
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_ggpo_perturbation_is_removed_exactly():
    model = Stack()
    aset = attach(model, AdapterConfig("lora-ggpo", rank=4, include_dense=True))
    frozen = [f.param.detach().clone() for f in aset.factors]
    x = torch.randn(5, 16)
    opt = torch.optim.AdamW(aset.parameters(), lr=1e-2)
    adapters_before = [p.detach().clone() for p in aset.parameters()]
    for step in range(3):
        aset.perturb(step)
        assert any(not torch.equal(f.param, w) for f, w in zip(aset.factors, frozen))  # perturbed during backward
        model(x).pow(2).sum().backward()
        aset.restore(step)
        for f, w in zip(aset.factors, frozen):
            assert torch.equal(f.param, w)  # bit-identical before the optimiser step
        opt.step()
        opt.zero_grad()
    # the gradient term enters from step 1 on
    assert all(d.grad_sq_rows is not None for d in aset.deltas)
    assert any(not torch.equal(p, q) for p, q in zip(aset.parameters(), adapters_before))  # only adapters trained


def test_none_adapter_trains_factors_on_their_support():
    model = Stack()
    before = _snapshot(model)
    aset = attach(model, AdapterConfig("none"))
    opt = torch.optim.AdamW(aset.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randn(5, 16)
    for _ in range(3):
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    aset.merge()
    after = _snapshot(model)
    assert torch.equal(before[1]["mask"], after[1]["mask"]) and torch.equal(before[2]["mask"], after[2]["mask"])
    assert torch.equal(before[3]["idx"], after[3]["idx"])
    assert not model.layers[5].weight.requires_grad
    for k in (6, 7):  # SLTrain's support and LOST's channel set are buffers: unchanged, values trained
        assert torch.equal(before[k]["idx"], after[k]["idx"]) and before[k]["bytes"] == after[k]["bytes"]
    assert not torch.equal(model.layers[6].val, Stack().layers[6].val)
    assert not torch.equal(model.layers[7].Ws, Stack().layers[7].Ws)


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_bert_dir"])
def test_distillation_loss_is_zero_at_the_teacher(which, request):
    from factordeploy.models.registry import load_model

    loaded = load_model(str(request.getfixturevalue(which)))
    cfg = RecoveryConfig(steps=1, data="wiki", samples=4, seq_len=32, batch=2, eval_windows=2, temperature=2.0,
                         hidden_weight=0.5)
    teacher = capture_teacher(loaded, loaded.model, cfg)
    with torch.no_grad():
        for b, h in teacher.train:
            assert float(distill_loss(loaded, loaded.model, b, h, cfg)) == 0.0
        loaded.model.get_input_embeddings().weight.mul_(1.01)
        assert float(distill_loss(loaded, loaded.model, *teacher.train[0], cfg)) > 0


@pytest.mark.parametrize("adapter", ["lora", "wara", "none"])
def test_recovery_stage_on_a_compressed_tiny_llama(tiny_llama_dir, adapter, tmp_path):
    from factordeploy.compress.base import CompressContext, get_method
    from factordeploy.compress.targets import find_targets
    from factordeploy.models.registry import load_model

    loaded = load_model(str(tiny_llama_dir))
    model = loaded.model
    cfg = RecoveryConfig(steps=6, adapter=adapter, rank=4, data="wiki", samples=8, seq_len=32, batch=2,
                         eval_windows=2, eval_every=2, lr=3e-3, checkpoint=str(tmp_path / "ck"))
    teacher = capture_teacher(loaded, model, cfg)
    get_method("svd").compress(model, find_targets(model), CompressContext(0.5))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "embed" in n or "norm" in n}
    rep = recover(loaded, model, teacher, cfg)
    assert rep.bytes_unchanged
    assert rep.adapter["trainable_params"] > 0 and rep.adapter["factors_by_layer_kind"] == {"lowrank": 28}
    t = rep.train
    assert len(t["losses"]) == 6 and [s for s, _ in t["eval_curve"]] == [0, 2, 4, 6]
    assert t["best_eval"] <= t["eval_curve"][0][1]
    assert t["best_eval"] < t["eval_curve"][0][1]  # 6 steps at lr 3e-3 do lower the held-out KL
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
    assert (tmp_path / "ck" / "trainer.pt").exists()
    # the merged model's held-out loss is the best state's
    ev = sum(float(distill_loss(loaded, model, b, h, cfg)) for b, h in teacher.select) / len(teacher.select)
    assert ev == pytest.approx(t["best_eval"], rel=1e-4)


@pytest.mark.parametrize("content, match", [(None, "not found"), (b"", "empty"), (b"\x00\x01\x02binary", "binary data"),
                                            (b"\xff\xfe bad", "not UTF-8")])
def test_bad_recover_data_fails_before_any_work(tmp_path, content, match):
    from factordeploy.cli import main

    f = tmp_path / "data.txt"
    if content is not None:
        f.write_bytes(content)
    r = CliRunner().invoke(main, ["build", "--model", str(tmp_path / "no-model-needed"), "--method", "svd",
                                  "--out", str(tmp_path / "out"), "--recover-steps", "5", "--recover-data", str(f)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: --recover-data") and match in lines[0]
    assert not (tmp_path / "out").exists()


def test_build_with_recovery_end_to_end(tiny_llama_dir, tmp_path):
    """`deploy build ... --recover-steps` on a tiny decoder: the stage runs between compression and
    export, the report records it, and the exported model is the merged one (export check passes)."""
    import json

    from factordeploy.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_llama_dir), "--method", "sparse24", "--score", "magnitude",
                                  "--out", str(out), "--no-baseline", "--backend", "ort", "--calib", "4", "--calib-len", "32",
                                  "--recover-steps", "3", "--adapter", "lora-ggpo", "--adapter-rank", "2",
                                  "--recover-data", "wiki", "--recover-samples", "4", "--recover-batch", "2", "--quiet", "--no-eval",
                                  "--recover-hidden-weight", "0.5"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    rec = rep["recovery"]
    assert rec["adapter"]["adapter"] == "lora-ggpo" and rec["bytes_unchanged"]
    assert rec["config"]["hidden_weight"] == 0.5
    assert len(rec["train"]["losses"]) == 3
    assert rep["fidelity"]["passed"]
    assert "## Recovery" in (out / "report.md").read_text()
