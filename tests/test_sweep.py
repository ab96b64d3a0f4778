"""`deploy sweep` on a tiny encoder: cells, resume, shared calibration statistics, table and plots."""

from __future__ import annotations

import json

import pytest

from factordeploy.compress.calibration import CalibrationConfig
from factordeploy.errors import UserError
from factordeploy.sweep import SweepConfig, run_sweep
from factordeploy.sweep.pareto import frontier
from factordeploy.verify.domains import DomainSample

PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(model, out, methods, ratios, calib_mode="original"):
    return SweepConfig(model=str(model), methods=methods, ratios=ratios, out=str(out), calib_mode=calib_mode,
                       calib=CalibrationConfig(n=8, length=32, seed=0), sample=DomainSample(sentences=16),
                       latency_runs=3, latency_rounds=1)


def test_frontier():
    pts = [(1.0, 0.5, "a"), (2.0, 0.9, "b"), (2.5, 0.8, "c"), (3.0, 1.0, "d"), (1.0, 0.4, "e")]
    assert [p[2] for p in frontier(pts, higher_is_better=True)] == ["a", "b", "d"]
    ppl = [(1.0, 30.0, "a"), (2.0, 20.0, "b"), (2.0, 25.0, "c")]
    assert [p[2] for p in frontier(ppl, higher_is_better=False)] == ["a", "b"]


def test_sweep_builds_resumes_and_shares_calibration(tiny_bert_dir, tmp_path):
    out = tmp_path / "sweep"
    res = run_sweep(_cfg(tiny_bert_dir, out, ("svd", "svd-whiten"), (0.5,)))
    assert (res.built, res.reused) == (2, 0)
    data = json.loads((out / "sweep.json").read_text())
    assert [r["cell"] for r in data["rows"]] == ["svd_r0.5", "svd-whiten_r0.5"]
    for r in data["rows"]:
        assert set(r["quality"]) == {"wiki", "news", "pydoc"}
        assert all(0.5 < q["cosine_mean"] <= 1.0 and q["sentences"] == 16 for q in r["quality"].values())
        assert r["export_check"] and r["onnx_mb"] < data["original"]["onnx_mb"]
        assert r["latency_ms"] > 0 and r["build_latency_ms"] > 0
    assert data["original"]["latency_ms"] > 0
    md = (out / "sweep.md").read_text()
    assert "| svd-whiten | 0.50 |" in md and "news (out)" in md and "wiki (in)" in md
    for p in res.plots:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000
    store = list((out / "calib-cache").glob("calib-*.pt"))
    assert len(store) == 1
    # ONNX Runtime's own w8 / w4 of the original, scored and timed beside the cells, in the table and plots
    an = {a["cell"]: a for a in data["anchors"]}
    assert sorted(an) == ["ort-w4", "ort-w8"] and [a["cell"] for a in res.anchors] == ["ort-w8", "ort-w4"]
    for a in an.values():
        assert a["weights_mb"] < data["original"]["onnx_mb"] and a["latency_ms"] > 0
        assert all(0.5 < q["cosine_mean"] <= 1.0 for q in a["quality"].values())
    assert an["ort-w4"]["weights_mb"] < an["ort-w8"]["weights_mb"]
    assert an["ort-w8"]["quality"]["wiki"]["cosine_mean"] >= an["ort-w4"]["quality"]["wiki"]["cosine_mean"] - 1e-4
    assert "| ort-w4 (ORT's quantizer on the original) |" in md

    # same request again: nothing is rebuilt, figures unchanged
    mtime = (out / "cells" / "svd_r0.5" / "model.onnx").stat().st_mtime
    again = run_sweep(_cfg(tiny_bert_dir, out, ("svd", "svd-whiten"), (0.5,)))
    assert (again.built, again.reused) == (0, 2)
    assert (out / "cells" / "svd_r0.5" / "model.onnx").stat().st_mtime == mtime
    assert [r["quality"] for r in again.rows] == [r["quality"] for r in data["rows"]]

    # a cell killed after its build but before scoring is scored, not rebuilt; a new ratio reuses the statistics
    (out / "cells" / "svd_r0.5.json").unlink()
    more = run_sweep(_cfg(tiny_bert_dir, out, ("svd", "svd-whiten"), (0.5, 0.35)))
    assert (more.built, more.reused) == (2, 2) and len(more.rows) == 4  # svd_r0.5 re-scored, not rebuilt
    rep = json.loads((out / "cells" / "svd-whiten_r0.35" / "report.json").read_text())
    assert rep["calibration"]["stats_store"]["grams_reused"] > 0
    new = next(r for r in more.rows if r["cell"] == "svd-whiten_r0.35")
    assert new["calibration_reused"] > 0 and new["targeted_reduction"] < 0.5


def test_sweep_default_calibrates_sequential_cells_themselves(tiny_bert_dir, tmp_path):
    """auto = each method's measured default: svd-whiten calibrates block by block on the compressed prefix
    (no shared Grams to store), plain svd stays one-shot; a sweep-wide `sequential` skips data-free methods."""
    out = tmp_path / "sweep"
    res = run_sweep(_cfg(tiny_bert_dir, out, ("svd", "svd-whiten"), (0.5,), calib_mode="auto"))
    assert res.built == 2
    rep = lambda c: json.loads((out / "cells" / c / "report.json").read_text())  # noqa: E731
    assert rep("svd-whiten_r0.5")["method"]["extra"]["blockwise"]["calib_mode"] == "sequential"
    assert "blockwise" not in rep("svd_r0.5")["method"].get("extra", {})
    seq = run_sweep(_cfg(tiny_bert_dir, tmp_path / "seq", ("svd",), (0.5,), calib_mode="sequential"))
    assert seq.built == 1


def test_sweep_rejects_bad_input(tiny_bert_dir, tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        run_sweep(_cfg(tiny_bert_dir, tmp_path / "s", ("nope",), (0.5,)))
    with pytest.raises(UserError, match="outside"):
        run_sweep(_cfg(tiny_bert_dir, tmp_path / "s", ("svd",), (1.5,)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        run_sweep(_cfg(tiny_bert_dir, tmp_path / "file", ("svd",), (0.5,)))


def test_sweep_builds_auto_at_each_budget(tiny_bert_dir, tmp_path):
    """auto cells take --budgets, not --ratios: each meets its budget and sits in the table beside the fixed cells."""
    out = tmp_path / "sweep"
    cfg = _cfg(tiny_bert_dir, out, ("svd", "auto"), (0.5,))
    cfg.budgets = (0.2, 0.4)
    res = run_sweep(cfg)
    assert sorted(r["cell"] for r in res.rows) == ["auto_b0.2", "auto_b0.4", "svd_r0.5"]
    for b in cfg.budgets:
        rep = json.loads((out / "cells" / f"auto_b{b:g}" / "report.json").read_text())
        sz = rep["size"]
        assert rep["method"]["options"]["budget"] == b
        assert sz["targeted_bytes_after"] <= b * sz["targeted_bytes_before"]
    auto = {r["ratio"]: r for r in res.rows if r["method"] == "auto"}
    cos = lambda b: auto[b]["quality"]["wiki"]["cosine_mean"]  # noqa: E731
    assert cos(0.4) >= cos(0.2) - 1e-3  # more bytes, no worse in domain
    assert "auto at budgets 0.2, 0.4" in res.table_md.read_text()
    again = run_sweep(cfg)
    assert again.built == 0 and again.reused == 3


def test_sweep_cli_rejects_unknown_anchors(tiny_bert_dir, tmp_path):
    from click.testing import CliRunner

    from factordeploy.cli import main

    r = CliRunner().invoke(main, ["sweep", "--model", str(tiny_bert_dir), "--methods", "svd", "--ratios", "0.5",
                                  "--anchors", "ort-w3", "--out", str(tmp_path / "s"), "--quiet"])
    assert r.exit_code == 2 and "--anchors" in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s" / "cells").exists()
