"""End to end on the real default model: `deploy build --model minilm --method svd --ratio 0.5`."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from factordeploy.cli import main
from factordeploy.passes.annotate import factorized_nodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "minilm-svd"
    r = CliRunner().invoke(main, ["build", "--model", "minilm", "--method", "svd", "--ratio", "0.5",
                                  "--out", str(out), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "report.json").read_text())


def test_artifacts_and_no_leftovers(minilm_build):
    out, rep = minilm_build
    for f in ("model.onnx", "baseline.onnx", "report.json", "report.md", "config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (out / f).is_file(), f
    opt = rep["serving"]["ort_optimized"]
    assert (out / "model.ort-optimized.onnx").is_file() == opt["kept"], opt
    assert opt["kept"] == ("ort_optimized" in rep["artifacts"])
    if opt["kept"]:
        assert opt["optimized_bytes"] <= opt["model_bytes"] and opt["optimized_ms"] < opt["model_ms"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    md = (out / "report.md").read_text()
    assert "PASSED" in md and "Latency" in md and "polarity" in md
    # the first lines say whether this is a model worth shipping: svd at 0.5 is not (cosine ~0.35)
    cos = rep["quality"]["compressed"]["embedding_cosine_mean"]
    assert f"**Quality bar: NOT MET - mean embedding cosine to the original {cos:.4f} < 0.95" in md.splitlines()[2]


def test_report_sizes_match_hand_computation(minilm_build):
    _, rep = minilm_build
    s = rep["size"]
    # MiniLM: 6 blocks x (4 x 384x384 + 2 x 384x1536) fp32 weights
    assert s["targeted_layers"] == 36 and s["factorized_layers"] == 36
    assert s["targeted_bytes_before"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 4
    # ranks 96 (384x384) and 153 (384<->1536)
    assert s["targeted_bytes_after"] == 6 * (4 * 96 * 768 + 2 * 153 * 1920) * 4
    assert s["params_before"] == 22_713_216
    assert s["params_before"] - s["params_after"] == (s["targeted_bytes_before"] - s["targeted_bytes_after"]) // 4
    ranks = {lay["after"]["rank"] for lay in rep["layers"]}
    assert ranks == {96, 153}


def test_export_check_and_quality(minilm_build):
    out, rep = minilm_build
    f = rep["fidelity"]
    assert f["passed"] and f["max_abs"] < f["atol"] + 1e-9 + f["rtol"] * 10
    assert f["runners"] == ["torch", "onnxruntime"]
    q = rep["quality"]
    assert q["original"]["polarity_accuracy"] == pytest.approx(0.74, abs=0.02)  # MODELS.md reference
    assert 0.0 < q["compressed"]["embedding_cosine_mean"] < 0.999
    order = [p["pass"] for p in rep["passes"]]
    assert order.index("name-factorized") < order.index("fold-constants")
    named = rep["passes"][order.index("name-factorized")]
    assert named["layers_named"] == 36 and named["layers_missing"] == 0
    assert len(factorized_nodes(onnx.load(str(out / "model.onnx")))) == 36
    assert {p["batch"] for p in rep["latency"]["points"]} == {1, 8}
    for p in rep["latency"]["points"]:
        assert p["seq"] == 128 and p["compressed"]["runs"] == p["original"]["runs"] == 20
        for side in ("compressed", "original"):
            assert 0 < p[side]["median_ms"] <= p[side]["p90_ms"]
        assert p["speedup"] == round(p["original"]["median_ms"] / p["compressed"]["median_ms"], 3)
