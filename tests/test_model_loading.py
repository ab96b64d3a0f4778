"""Model loading that never runs untrusted code and never loses meaning: GPT-2 Conv1D as nn.Linear,
safe checkpoint loading everywhere, text inputs validated by one helper, ONNX external data confined."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from factordeploy.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "factordeploy"


# ---------------------------------------------------------------- GPT-2 Conv1D


def test_conv1d_converted_exactly_on_tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from factordeploy.models.conv1d import conv1d_to_linear

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=48, n_layer=2, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 300, (2, 17))
    convs = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in model.named_modules() if isinstance(m, Conv1D)}
    with torch.no_grad():
        before = model(ids).logits
    names = conv1d_to_linear(model)
    assert sorted(names) == sorted(convs) and len(names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    for n, (w, b) in convs.items():
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear
        assert torch.equal(lin.weight, w.t()) and torch.equal(lin.bias, b)  # values copied, not recomputed
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.no_grad():
        after = model(ids).logits
    # x W + b (addmm) and x (W^T)^T + b (linear) are the same GEMM up to summation order
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_gpt2_folder_builds_and_its_projections_are_compressed(tiny_gpt2_dir, tmp_path):
    from factordeploy.cli import main
    from factordeploy.outdir import MARKER

    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "stale-from-last-build.onnx").write_text("old")
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_gpt2_dir), "--method", "svd", "--ratio", "0.5",
                                  "--out", str(out), "--no-eval", "--no-baseline", "--backend", "ort", "--quiet"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["kind"] == "decoder"
    names = {lay["name"] for lay in rep["layers"]}
    assert names == {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert rep["size"]["factorized_layers"] == 8 and rep["fidelity"]["passed"]
    # c_attn is 64 -> 192: at ratio 0.5 the rank keeps half of 64*192 weights: r*(64+192) <= 6144 -> 24
    c_attn = next(lay for lay in rep["layers"] if lay["name"] == "transformer.h.0.attn.c_attn")
    assert c_attn["after"]["rank"] == 24
    assert not (out / "stale-from-last-build.onnx").exists() and (out / MARKER).is_file()  # replaced, marked


# ---------------------------------------------------------------- no unsafe pickle loading


def test_no_unsafe_deserialisation_in_the_package():
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", src):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{f.name}: {m.group(0)[:80]}")
        for bad in ("weights_only=False", "pickle.load(", "pickle.loads(", "allow_pickle=True", "trust_remote_code=True"):
            if bad in src:
                offenders.append(f"{f.name}: {bad}")
    assert offenders == []
    assert "torch.load(" in (PACKAGE / "train" / "checkpoint.py").read_text()  # the grep sees real calls


def test_stf_checkpoint_resumes_through_the_safe_loader(tiny_bert_dir, tmp_path):
    from factordeploy.compress.base import CompressContext, get_method
    from factordeploy.compress.calibration import Calibration, CalibrationConfig
    from factordeploy.compress.targets import find_targets
    from factordeploy.models.registry import load_model

    def run(steps: int):
        loaded = load_model(str(tiny_bert_dir))
        cal = Calibration(loaded, CalibrationConfig(n=4, length=32))
        ctx = CompressContext(0.5, options={"stf_steps": steps, "stf_batch": 2, "stf_lr": 1e-3,
                                            "stf_checkpoint": str(tmp_path / "ck"), "stf_save_every": 1},
                              calibration=cal)
        return get_method("dsformer").compress(loaded.model, find_targets(loaded.model), ctx)

    first = run(2)
    second = run(2)  # the finished run's trainer.pt is read back with weights_only=True
    assert len(first.extra["stf_loss_curve"]) == 2
    assert second.extra["stf_loss_curve"] == first.extra["stf_loss_curve"]
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["trainer.pt"]


# ---------------------------------------------------------------- the one text-input helper


def test_text_input_accepts_text_jsonl_and_bom(tmp_path):
    from factordeploy.models.text import read_text_input

    (tmp_path / "a.txt").write_bytes("\ufeffFirst document.\n\nSecond document.\n".encode())
    assert read_text_input(tmp_path / "a.txt", "--calib-data") == ["First document.", "Second document."]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_text_input(tmp_path / "b.jsonl", "--calib-data") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"body": "one"}\n')
    assert read_text_input(tmp_path / "c.jsonl", "--recover-data", field="body") == ["one"]
    with pytest.raises(UserError, match="--recover-data .* has no 'text' field"):
        read_text_input(tmp_path / "c.jsonl", "--recover-data")


def test_token_budget_names_the_flags_and_what_fits():
    from factordeploy.models.text import check_token_budget

    check_token_budget(1000, 7, 128, "f")
    with pytest.raises(UserError, match=r"f has 1,000 tokens, fewer than the --calib 8 x --calib-len 128 = 1,024.*--calib 7"):
        check_token_budget(1000, 8, 128, "f")


# ---------------------------------------------------------------- ONNX external data stays in its folder


def _external_model(folder: Path, location: str) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx"),
                    save_as_external_data=True, location="w.data", size_threshold=0)
    if location != "w.data":
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for e in proto.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = location
        onnx.save_model(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_external_data_inside_the_folder_loads(tmp_path):
    from factordeploy.engines.ort import session
    from factordeploy.export.onnx_files import load_onnx

    path = _external_model(tmp_path / "m", "w.data")
    w = onnx.numpy_helper.to_array(load_onnx(path).graph.initializer[0])
    assert w.tolist() == np.arange(16, dtype=np.float32).reshape(4, 4).tolist()
    y = session(path).run(None, {"x": np.ones((1, 4), np.float32)})[0]
    assert y.tolist() == [[24.0, 28.0, 32.0, 36.0]]


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "missing"])
def test_external_data_outside_the_folder_is_refused(tmp_path, kind):
    from factordeploy.engines.ort import session
    from factordeploy.export.onnx_files import load_onnx

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(16, np.float32).tobytes())
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.bin", "missing": "nope.bin"}[kind]
    path = _external_model(tmp_path / "m", location)
    if kind == "symlink":
        (tmp_path / "m" / "link.bin").symlink_to(secret)
    expect = {"parent": "outside the folder", "absolute": "the absolute path", "symlink": "through a symbolic link",
              "missing": "which does not exist"}[kind]
    for read in (load_onnx, session):
        with pytest.raises(UserError, match=f"keeps tensor 'W' in .*{expect}"):
            read(path)
