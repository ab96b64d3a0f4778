"""`deploy inspect`, `deploy verify`, `deploy export-triton` / `build --format triton` on a tiny built folder."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from factordeploy.cli import main
from factordeploy.errors import UserError
from factordeploy.serve.triton import TensorSpec, TritonModel, parse_config, render_config, validate_repository, write_repository


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "bert-svd"
    r = _run(["build", "--model", str(tiny_bert_dir), "--method", "svd", "--ratio", "0.5", "--out", str(out),
              "--backend", "ort", "--no-baseline", "--format", "triton", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "validated 1 config.pbtxt" in r.output
    return out


def _copy(folder, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("triton"))
    return dst


def test_inspect_summarizes_the_build(folder):
    rep = json.loads((folder / "report.json").read_text())
    r = _run(["inspect", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    (row,) = s["layers"]
    assert row["kind"] == "lowrank" and row["layers"] == rep["size"]["factorized_layers"] == 12
    ranks = sorted(lay["after"]["rank"] for lay in rep["layers"])
    assert row["rank"]["min"] == ranks[0] and row["rank"]["max"] == ranks[-1]
    assert row["bytes_after"] == rep["size"]["targeted_bytes_after"]
    assert s["graph"]["factorized_layers_in_graph"] == 12 and s["graph"]["consistent"]
    assert s["files"]["model.onnx"] == os.path.getsize(folder / "model.onnx")
    assert s["serving"]["triton_repository"] and "config.json" in s["serving"]["hf_files"]
    text = _run(["inspect", str(folder)]).output
    assert "lowrank" in text and "export check: PASSED" in text


def test_verify_passes_on_the_folder_and_fails_on_a_damaged_copy(folder, tmp_path):
    ok = _run(["verify", str(folder), "--domain", "news", "--samples", "24", "--quiet", "--json"])
    assert ok.exit_code == 0, ok.output
    res = json.loads(ok.output)
    q = res["checks"][-1]
    assert q["domain"] == "news" and q["sentences"] == 24 and q["cosine_mean"] >= q["threshold"]["min_cosine"]

    bad = _copy(folder, tmp_path)
    m = onnx.load(str(bad / "model.onnx"))
    for init in m.graph.initializer:  # scramble every factor matrix: the model no longer matches the original
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim == 2 and min(a.shape) > 8:
            init.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(a.reshape(-1)).reshape(a.shape), init.name))
    onnx.save(m, str(bad / "model.onnx"))
    (bad / "model.ort-optimized.onnx").unlink(missing_ok=True)
    r = _run(["verify", str(bad), "--domain", "wiki", "--samples", "24", "--quiet"])
    assert r.exit_code == 1, r.output
    assert "[FAIL] quality vs the original on wiki" in r.output and "verify FAILED" in r.output


def test_verify_bad_folders_are_one_line_errors(folder, tmp_path):
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "missing")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "build folder not found" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "not a build folder" in r.output
    broken = _copy(folder, tmp_path, "broken")
    (broken / "report.json").write_text("{not json")
    r = CliRunner().invoke(main, ["inspect", str(broken)])
    assert r.exit_code == 2 and "not a factordeploy report" in r.output


def test_external_data_outside_the_folder_is_refused(folder, tmp_path):
    evil = _copy(folder, tmp_path, "evil")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    m = onnx.load(str(evil / "model.onnx"))
    t = next(i for i in m.graph.initializer if numpy_helper.to_array(i).size > 100)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "4096")):
        e = t.external_data.add()
        e.key, e.value = k, v
    onnx.save(m, str(evil / "model.onnx"))
    for cmd in ("verify", "inspect", "export-triton"):
        r = CliRunner().invoke(main, [cmd, str(evil)])
        assert r.exit_code == 2, (cmd, r.output)
        assert "outside the folder" in r.output and r.output.count("\n") == 1


def test_triton_repository_validates_against_tritons_schema(folder):
    repo = folder / "triton"
    models = validate_repository(repo)
    (m,) = models
    assert m["backend"] == "onnxruntime" and m["max_batch_size"] == 32 and m["dynamic_batching"]
    assert m["inputs"] == [("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1]),
                           ("token_type_ids", "TYPE_INT64", [-1])]
    assert m["outputs"] == [("last_hidden_state", "TYPE_FP32", [-1, 64])]
    served = repo / m["name"] / "1" / "model.onnx"
    assert served.read_bytes() == (folder / "model.onnx").read_bytes()
    manifest = json.loads((repo / "factordeploy_triton.json").read_text())
    assert manifest["tensorrt_plan"].startswith("not written: no TensorRT engine")


def test_triton_configs_are_checked_by_the_schema():
    good = TritonModel("m", "onnxruntime", "model.onnx", 8, [TensorSpec("x", "TYPE_FP32", [-1, 4])],
                       [TensorSpec("y", "TYPE_FP32", [-1])])
    cfg = parse_config(render_config(good))
    assert cfg.input[0].dims == [-1, 4] and cfg.dynamic_batching.max_queue_delay_microseconds == 100
    with pytest.raises(UserError, match="does not parse"):
        parse_config(render_config(good) + "max_queue_size: 3\n")  # not a ModelConfig field
    with pytest.raises(UserError, match="does not parse"):
        parse_config(render_config(good).replace("TYPE_FP32", "TYPE_FLOAT32"))


def test_tensorrt_plan_model_where_a_loadable_engine_exists(folder, tmp_path):
    src = _copy(folder, tmp_path, "with_engine")
    (src / "model.engine").write_bytes(b"serialized-engine-bytes")
    rep = json.loads((src / "report.json").read_text())
    rep["engine"] = {"backend": "trt", "engine_path": "model.engine", "onnx_path": "model.onnx", "plugin_layers": 0,
                     "profile": {"input_ids": {"min": [1, 1], "opt": [8, 128], "max": [16, 512]}}}
    man = write_repository(src, rep, tmp_path / "repo")
    assert man["tensorrt_plan"] == "written"
    by_name = {m["name"]: m for m in validate_repository(tmp_path / "repo")}
    trt = by_name[next(n for n in by_name if n.endswith("_trt"))]
    assert trt["backend"] == "tensorrt_plan" and trt["max_batch_size"] == 16
    assert (tmp_path / "repo" / trt["name"] / "1" / "model.plan").read_bytes() == b"serialized-engine-bytes"

    rep["engine"]["backend"] = "trt-rtx"  # Triton's TensorRT backend cannot load a TensorRT-RTX engine
    man = write_repository(src, rep, tmp_path / "repo")
    assert "TensorRT-RTX" in man["tensorrt_plan"] and len(validate_repository(tmp_path / "repo")) == 1

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    r = CliRunner().invoke(main, ["export-triton", str(src), "--out", str(tmp_path / "mine")])
    assert r.exit_code == 2 and (tmp_path / "mine" / "keep.txt").is_file()
