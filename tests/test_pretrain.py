"""`deploy pretrain`: the parametrisations (equal parameters, the papers' initialisations), a tiny run
on the shared training loop, and the round trip of its Hugging Face folder through `deploy build`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from factordeploy.compress.layers import ChannelSparseLowRankLinear, LowRankLinear, SparsePlusLowRankLinear
from factordeploy.pretrain.param import ParamConfig, _dense_init, make_layer


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("shape", [(256, 256), (688, 256), (256, 688)])
def test_parametrisations_hold_equal_parameters(shape):
    out_f, in_f = shape
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    counts = {}
    for kind in ("lowrank", "sltrain", "lost"):
        layer = make_layer(lin, ParamConfig(kind, rank=64, delta=0.03), torch.Generator().manual_seed(0))
        counts[kind] = _params(layer)
    want = 64 * (out_f + in_f) + round(0.03 * out_f * in_f)
    assert counts["sltrain"] == want
    for kind in ("lowrank", "lost"):
        assert abs(counts[kind] - want) <= max(out_f, in_f) + out_f + in_f, (kind, counts)  # one rank / channel of rounding
    assert all(c < out_f * in_f for c in counts.values())


def test_sltrain_and_lost_initialisations():
    lin = torch.nn.Linear(40, 48, bias=False)
    s = make_layer(lin, ParamConfig("sltrain", rank=8, alpha=32, delta=0.05), torch.Generator().manual_seed(1))
    assert isinstance(s, SparsePlusLowRankLinear) and s.scale == 4.0 and float(s.B.abs().max()) == 0.0
    assert s.nnz == round(0.05 * 40 * 48) and float(s.val.abs().max()) <= 1 / math.sqrt(40)
    torch.testing.assert_close(s.dense_weight(), s.sparse_weight())  # B = 0: W starts as S
    # LOST: top-8 SVD of the dense init + its residual on the 2 channels with the largest residual norms
    l = make_layer(lin, ParamConfig("lost", rank=8, delta=0.05, gamma=0.5), torch.Generator().manual_seed(2))
    assert isinstance(l, ChannelSparseLowRankLinear) and l.channels.numel() == 2
    W0 = _dense_init(48, 40, torch.Generator().manual_seed(2)).double()
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    R = (U[:, 8:] * S[8:]) @ Vh[8:]
    assert sorted(l.channels.tolist()) == sorted(torch.topk(R.norm(dim=0), 2).indices.tolist())
    keep = R.clone()
    keep[:, l.channels] = 0
    torch.testing.assert_close(l.dense_weight().double(), W0 - keep, rtol=1e-5, atol=1e-6)
    r = make_layer(lin, ParamConfig("lowrank", rank=8, delta=0.05), torch.Generator().manual_seed(3))
    assert isinstance(r, LowRankLinear) and r.rank == 8 + round(0.05 * 40 * 48 / 88)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from factordeploy.pretrain import PretrainConfig, run_pretrain

    out = tmp_path_factory.mktemp("pt") / "sltrain"
    res = run_pretrain(PretrainConfig(out=str(out), params="tiny", param="sltrain", tokens=2048, seq_len=32, batch=4,
                                      eval_windows=4, eval_every=4))
    return out, res


def test_pretrain_run_writes_a_folder_with_curves(pretrained):
    out, res = pretrained
    doc = json.loads((out / "pretrain.json").read_text())
    assert doc["steps"] == 16 and doc["tokens"] == 16 * 4 * 32
    assert [s for s, _ in doc["curve"]] == [0, 4, 8, 12, 16]
    assert doc["curve"][-1][1] < doc["curve"][0][1]  # the held-out loss fell
    assert set(doc["perplexity"]) == {"wiki", "news", "pydoc"}
    assert doc["config"]["lr"] == 3e-3 and doc["trainable_params"] == doc["model_params"] > doc["block_params"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary folder left


def test_pretrained_folder_round_trips(pretrained, tmp_path):
    """The saved folder loads as a plain Llama whose held-out loss is the reported one, and `deploy build`
    compresses it (SLTrain again) with a passing export check."""
    from factordeploy.build import BuildConfig, run_build
    from factordeploy.compress.calibration import CalibrationConfig
    from factordeploy.models.registry import load_model
    from factordeploy.pretrain.run import DOMAINS, _batches, mean_loss, token_stream, windows
    from factordeploy.models import text as textmod

    out, res = pretrained
    loaded = load_model(str(out))
    assert loaded.kind == "decoder"
    wins = windows(token_stream(loaded.tokenizer, textmod.domain_texts("wiki")), 32, 4)
    assert mean_loss(loaded.model, _batches(wins, 4), "cpu") == pytest.approx(res.eval_loss["wiki"], abs=2e-4)
    run_build(BuildConfig(model=str(out), method="sltrain", ratio=0.5, out=str(tmp_path / "b"), backend="ort",
                          evaluate=False, baseline=False, latency_points=((1, 16),), latency_runs=1,
                          calib=CalibrationConfig(n=4, length=32)))
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["fidelity"]["passed"] and rep["size"]["factorized_layers"] == 14


def test_bad_input_is_one_line_exit_2(tmp_path):
    from factordeploy.cli import main

    r = CliRunner().invoke(main, ["pretrain", "--params", "7B", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown --params '7B'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["pretrain", "--params", "tiny", "--tokens", "10", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "less than one batch" in r.output
    assert not (tmp_path / "x").exists()
