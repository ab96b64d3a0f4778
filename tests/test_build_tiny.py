"""The build's stage list on a tiny random model: --out replacement, --calib-data, the typed report."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from factordeploy.build import STAGES, BuildConfig, run_build
from factordeploy.cli import main
from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.models import load_model
from factordeploy.models.text import load_user_text

FAST = ["--no-eval", "--no-baseline", "--backend", "ort", "--quiet"]


def _cfg(model_dir, out, **kw) -> BuildConfig:
    return BuildConfig(model=str(model_dir), out=str(out), evaluate=False, baseline=False, backend="ort",
                       latency_points=((1, 8),), latency_runs=2, calib=CalibrationConfig(n=2, length=16), **kw)


def test_stage_list_is_short_and_ordered():
    names = [f.__name__ for f in STAGES]
    assert names.index("reference") < names.index("compress") < names.index("evaluate")  # original scored first
    assert names.index("export") < names.index("ort_graph") < names.index("tensorrt") < names.index("verify_export")
    assert len(names) <= 20


def test_out_replaces_an_existing_deploy_folder(tiny_bert_dir, tmp_path):
    out = tmp_path / "o"
    first = run_build(_cfg(tiny_bert_dir, out, ratio=0.5))
    (out / "stale.txt").write_text("left by someone")
    second = run_build(_cfg(tiny_bert_dir, out, ratio=0.25))
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"]["ratio"] == 0.25 and rep["report_version"] == 2
    assert not (out / "stale.txt").exists()  # the old folder was replaced as a whole, not merged into
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .tmp / .old leftovers
    # the typed report is what report.json holds
    assert rep["size"]["targeted_bytes_after"] == second.report.size.targeted_bytes_after
    assert second.report.size.targeted_bytes_after > first.report.size.targeted_bytes_after
    assert rep["fidelity"]["passed"] is second.report.fidelity.passed is True
    point = rep["latency"]["points"][0]
    assert (point["batch"], point["seq"], point["compressed"]["runs"]) == (1, 8, 2)
    assert 0 < point["compressed"]["median_ms"] <= point["compressed"]["p90_ms"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_calib_data_reaches_the_calibration(tiny_bert_dir, tmp_path, suffix):
    docs = [f"Document {i} talks about rivers, bridges and the engineers who built them in {1900 + i}." * 3
            for i in range(6)]
    f = tmp_path / f"calib{suffix}"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs) if suffix == ".jsonl" else "\n\n".join(docs))
    assert load_user_text(f) == docs
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_bert_dir), "--method", "svd-whiten", "--calib", "3",
                                  "--calib-len", "16", "--calib-data", str(f), "--out", str(out), *FAST],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    c = json.loads((out / "report.json").read_text())["calibration"]
    assert (c["source"], c["n"], c["length"]) == (str(f), 3, 16)
    # every window is a slice of the user's text, tokenized: nothing came from the built-in corpus
    loaded = load_model(str(tiny_bert_dir))
    stream = loaded.token_ids(docs)
    windows = Calibration(loaded, CalibrationConfig(n=3, length=16, text_file=str(f))).windows()
    assert len(windows) == 3 and all(any(stream[i:i + 16] == w for i in range(len(stream) - 15)) for w in windows)


def test_calib_data_missing_file_is_one_line_error(tiny_bert_dir, tmp_path):
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_bert_dir), "--method", "svd-whiten", "--calib-data",
                                  str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--calib-data file not found" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="tensorrt_rtx_bindings not installed (scripts/setup.sh installs it)")
def test_tensorrt_stage_in_the_list_fp16(tiny_bert_dir, tmp_path):
    """--backend trt-rtx --precision fp16 on a tiny model: engine built ahead of time, not runnable here, so
    verify/ checks the fp16 TensorRT graph on ONNX Runtime against model.onnx; report.json keeps its layout."""
    out = tmp_path / "o"
    res = run_build(dataclasses.replace(_cfg(tiny_bert_dir, out, ratio=0.5), backend="trt-rtx", precision="fp16",
                                        trt_batch="1:2:4", trt_seq="1:16:32"))
    e = res.report.engine
    assert e.backend == "trt-rtx" and e.result is not None and not e.executed
    assert (out / e.result.engine_path).stat().st_size == e.result.engine_bytes
    g = e.trt_graph_on_ort
    assert g is not None and g.runners == ("onnxruntime", "onnxruntime-trt-graph") and not g.nan
    assert g.max_abs < 0.05 * g.reference_max_abs  # fp16 vs fp32 on the same graph: rounding, not a bug
    j = json.loads((out / "report.json").read_text())["engine"]
    assert j["engine_path"] == "model.engine" and j["precision"] == "fp16" and j["executed"] is False
    assert j["trt_graph_on_ort"]["max_abs"] == g.max_abs and j["passes"][0]["pass"] == "name-factorized"


def test_benchmark_pipeline_runs_the_build_stages_on_copies(tiny_bert_dir):
    import torch

    from factordeploy.pipeline import compress_and_score, open_session
    from factordeploy.recover.blockwise import BlockwiseConfig
    from factordeploy.verify.quality import EvalConfig

    s = open_session(str(tiny_bert_dir), CalibrationConfig(n=2, length=16), eval_cfg=EvalConfig(sentences=16, batch=16))
    before = {k: v.clone() for k, v in s.loaded.model.state_dict().items()}
    plain = compress_and_score(s, "svd", 0.5)
    # --calib-mode original: the layer Grams come from the shared session (sequential ones are per block)
    whitened = compress_and_score(s, "svd-whiten", 0.5, blockwise=BlockwiseConfig("original"))
    assert all(torch.equal(before[k], t) for k, t in s.loaded.model.state_dict().items())  # original untouched
    # 2 blocks x (4 x 64x64 attention + 64x128 + 128x64 FFN) fp32 weights
    assert plain.result.bytes_before == whitened.result.bytes_before == 2 * (4 * 64 * 64 + 2 * 64 * 128) * 4
    assert 0.45 < plain.reduction < 0.55 and s.calibration.tokens_seen > 0
    assert plain.quality["eval_sentences"] == 16 and plain.quality["embedding_cosine_mean"] < 1.0
