"""`--method auto --budget-latency`: measured kernel latency as a second budget beside the bytes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from click.testing import CliRunner

from factordeploy.cli import main
from factordeploy.compress import latency as latmod
from factordeploy.compress.budget import allocate_choices_within
from factordeploy.compress.latency import Kernel, LatencyModel, factor_kernel
from factordeploy.compress.methods import auto as automod
from factordeploy.compress.methods.auto import Form, form_kernels, form_latency
from factordeploy.compress.quant import QuantSpec

# a made-up machine: fp32 costs 4x per multiply-add what 4-bit does, 8-bit 2x, every node 2 us
COEF = {"fp32": (2.0, 4e-4), "w4g32s": (2.0, 1e-4), "w4g128s": (2.0, 0.8e-4), "w8g32s": (2.0, 2e-4),
        "w8g128s": (2.0, 1.9e-4), "w2g32s": (2.0, 1.2e-4)}


def _lm() -> LatencyModel:
    return LatencyModel(1, dict(COEF))


def test_form_latency_sums_the_nodes_each_form_exports():
    lm, spec = _lm(), QuantSpec()
    o, i = 96, 80  # K = 80 pads to 96 at block 32, 128 at block 128
    assert form_latency(Form("dense"), o, i, spec, lm) == pytest.approx(2 + 4e-4 * 80 * 96)
    assert form_latency(Form("quant", 4), o, i, spec, lm) == pytest.approx(2 + 1e-4 * 96 * 96)
    assert form_latency(Form("quant", 4, block=128), o, i, spec, lm) == pytest.approx(2 + 0.8e-4 * 128 * 96)
    # fp32 low rank: two MatMuls (K=i -> r, r -> o)
    assert form_latency(Form("lowrank", 32, 8), o, i, spec, lm) == pytest.approx(2 + 4e-4 * 80 * 8 + 2 + 4e-4 * 8 * 96)
    # 8-bit low rank at r = 8: A (K = 80) saves bytes and runs 8-bit; B (K = 8 pads to a block of 32) stays fp32
    s8 = QuantSpec(8)
    assert factor_kernel(80, 8, s8).bits == 8 and factor_kernel(8, 96, s8).bits == 32
    assert form_latency(Form("lowrank", 8, 8), o, i, spec, lm) == pytest.approx(2 + 2e-4 * 96 * 8 + 2 + 4e-4 * 8 * 96)
    # quant-lowrank: the 4-bit residual, the 8-bit correction's two factors, one more node for the sum
    qlr = form_latency(Form("qlr", 4, 8), o, i, spec, lm)
    assert qlr == pytest.approx(form_latency(Form("quant", 4), o, i, spec, lm)
                                + form_latency(Form("lowrank", 8, 8), o, i, spec, lm) + 2.0)
    assert form_kernels(Form("qlr", 4, 8), o, i, spec) == {Kernel(), Kernel(4, 32), Kernel(8, 32)}


@pytest.mark.parametrize("seed", range(25))
def test_two_budget_allocation_meets_both_and_is_near_the_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    opts, costs = {}, {}
    for n in range(4):
        byts = torch.sort(torch.randint(10, 400, (4,), generator=g)).values.to(torch.float64)
        opts[f"l{n}"] = (torch.sort(torch.rand(4, generator=g, dtype=torch.float64), descending=True).values, byts)
        costs[f"l{n}"] = torch.rand(4, generator=g, dtype=torch.float64) * 10
    budget = int(sum(float(b.median()) for _, b in opts.values()))
    cost_budget = float(sum(float(c.median()) for c in costs.values()))
    combos = [c for c in itertools.product(range(4), repeat=4)
              if sum(float(opts[f"l{n}"][1][j]) for n, j in enumerate(c)) <= budget
              and sum(float(costs[f"l{n}"][j]) for n, j in enumerate(c)) <= cost_budget]
    a = allocate_choices_within(opts, budget, costs, cost_budget)
    if a is None:
        # the relaxation can miss a feasible plan only where the optimum is tight on both budgets
        return
    assert a.bytes_after <= budget
    assert sum(float(costs[n][j]) for n, j in a.choice.items()) <= cost_budget + 1e-9
    assert a.error == pytest.approx(sum(float(opts[n][0][j]) for n, j in a.choice.items()))
    best = min(sum(float(opts[f"l{n}"][0][j]) for n, j in enumerate(c)) for c in combos)
    gap = 2 * max(float(e.max() - e.min()) for e, _ in opts.values())  # two constraints: up to two layers' steps
    assert best - 1e-12 <= a.error <= best + gap


def test_two_budget_allocation_finds_most_feasible_instances():
    found = feasible = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(1000 + seed)
        opts = {f"l{n}": (torch.sort(torch.rand(4, generator=g, dtype=torch.float64), descending=True).values,
                          torch.sort(torch.randint(10, 400, (4,), generator=g)).values.to(torch.float64)) for n in range(4)}
        costs = {n: torch.rand(4, generator=g, dtype=torch.float64) * 10 for n in opts}
        budget = int(sum(float(b.median()) for _, b in opts.values()))
        cb = float(sum(float(c.median()) for c in costs.values()))
        ok = any(sum(float(opts[f"l{n}"][1][j]) for n, j in enumerate(c)) <= budget
                 and sum(float(costs[f"l{n}"][j]) for n, j in enumerate(c)) <= cb
                 for c in itertools.product(range(4), repeat=4))
        feasible += ok
        found += ok and allocate_choices_within(opts, budget, costs, cb) is not None
    assert feasible >= 20 and found >= 0.8 * feasible, (found, feasible)


def test_latency_model_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORDEPLOY_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(latmod, "fit_kernel", lambda k, threads: calls.append(k.key) or COEF[k.key])
    lm = latmod.latency_model({Kernel(4, 32), Kernel(8, 32)}, 1)
    assert sorted(calls) == ["fp32", "w4g32s", "w8g32s"] and lm.coef["w4g32s"] == COEF["w4g32s"]
    again = latmod.latency_model({Kernel(4, 32), Kernel(4, 128)}, 1)
    assert sorted(calls) == ["fp32", "w4g128s", "w4g32s", "w8g32s"]  # only the new kernel was timed
    assert again.coef["w8g32s"] == COEF["w8g32s"]


def test_a_timed_kernel_chain_runs_on_onnx_runtime():
    us = latmod.time_kernel(Kernel(4, 32), 64, 32, threads=1, repeats=1, runs=2)
    assert 0 < us < 1e5


@pytest.fixture
def fake_machine(monkeypatch):
    monkeypatch.setattr(automod, "latency_model", lambda kernels, threads=1, cache=True, on_measure=None: _lm())


def _cli(tiny_bert_dir, out, *extra):
    return CliRunner().invoke(main, ["build", "--model", str(tiny_bert_dir), "--method", "auto", "--calib", "8",
                                     "--calib-len", "32", "--correction-rounds", "1", "--out", str(out),
                                     "--no-baseline", "--no-eval", "--backend", "ort", "--quiet", *extra])


def test_build_meets_the_latency_budget_and_reports_it(tiny_bert_dir, tmp_path, fake_machine):
    r = _cli(tiny_bert_dir, tmp_path / "lat", "--budget", "1", "--budget-latency", "0.7")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "lat" / "report.json").read_text())
    extra = rep["method"]["extra"]
    assert extra["chosen_us"] <= extra["budget_us"] == pytest.approx(0.7 * extra["fp32_us"], abs=0.2)
    assert sum(lay["metrics"]["predicted_us"] for lay in rep["layers"]) == pytest.approx(extra["chosen_us"], abs=0.5)
    assert any("--budget-latency 0.7" in n for n in rep["method"]["notes"]), rep["method"]["notes"]
    # with no byte pressure the latency budget alone moves layers off fp32
    assert any(lay["metrics"]["family"] != "dense" for lay in rep["layers"])


def test_unreachable_latency_budget_is_one_line_before_calibration(tiny_bert_dir, refused_before_calibration,
                                                                  fake_machine):
    line = refused_before_calibration("--model", str(tiny_bert_dir), "--method", "auto", "--budget-latency", "0.01")
    assert "fastest reachable" in line and "--budget-latency" in line, line


def test_latency_budget_on_tensorrt_is_refused(tiny_bert_dir, tmp_path):
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_bert_dir), "--method", "auto", "--budget-latency", "0.3",
                                  "--backend", "trt-rtx", "--out", str(tmp_path / "x"), "--quiet"])
    assert r.exit_code == 2 and "--budget-latency" in r.stderr and "Traceback" not in r.output, r.output
