"""CLI: listings, and every bad-input case gives one line, exit code 2, nothing under --out."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from factordeploy.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_methods_and_models_listings():
    r = run("methods")
    assert r.exit_code == 0 and "svd" in r.output and "--allocation" in r.output
    r = run("models")
    assert r.exit_code == 0 and "minilm" in r.output and "smollm2" in r.output and "Hugging Face folder" in r.output


def _bad(args: list[str], out: Path, expect: str):
    r = CliRunner().invoke(main, ["build", *args, "--out", str(out), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Fix:" in lines[0], r.output
    assert expect in lines[0]
    assert "Traceback" not in r.output
    assert not out.exists() or not any(out.iterdir())
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_unknown_model(tmp_path):
    _bad(["--model", "no-such-model"], tmp_path / "o", "unknown model 'no-such-model'")


def test_unknown_method(tmp_path):
    _bad(["--method", "nope"], tmp_path / "o", "unknown method 'nope'")


def test_missing_folder(tmp_path):
    _bad(["--model", str(tmp_path / "missing" / "model")], tmp_path / "o", "model folder not found")


def test_folder_that_is_not_a_model(tmp_path):
    d = tmp_path / "empty_model"
    d.mkdir()
    _bad(["--model", str(d)], tmp_path / "o", "is not a Hugging Face model folder")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_open_interval(tmp_path, ratio):
    _bad(["--ratio", ratio], tmp_path / "o", "--ratio must be between 0 and 1")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; covered by the read-only-file case")
def test_unwritable_out_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    _bad([], ro / "o", "is not writable")


def test_out_below_a_file_is_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(main, ["build", "--out", str(f / "sub" / "o"), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 2 and "is not writable" in r.output and "Traceback" not in r.output
    assert f.read_text() == "x"


def test_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(main, ["build", "--out", str(f), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 2 and "exists and is not a folder" in r.output and f.read_text() == "x"


def test_model_with_no_linear_layers(tiny_bert_dir, tmp_path):
    # a model whose selected layers contain no nn.Linear (pattern matches nothing linear)
    _bad(["--model", str(tiny_bert_dir), "--targets", "embeddings*", "--no-eval", "--no-baseline"],
         tmp_path / "o", "has no nn.Linear layers")


def test_option_of_another_method_is_rejected(tmp_path):
    # --score belongs to sparse24 (compress/methods/sparse24.py), not to svd
    _bad(["--method", "svd", "--score", "wanda"], tmp_path / "o", "do not apply to method 'svd'")


def test_method_option_values_checked_from_the_cli_neutral_declaration(tmp_path):
    """Choices/bounds declared once on MethodOption: click rejects them on the CLI (exit 2), and
    method_options rejects them for library callers."""
    from factordeploy.compress.base import method_options
    from factordeploy.errors import UserError

    r = CliRunner().invoke(main, ["build", "--method", "sparse24", "--score", "bogus", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "magnitude" in r.output and "wanda" in r.output and "sparsegpt" in r.output
    r = CliRunner().invoke(main, ["build", "--method", "welore", "--min-reduction", "1.5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "min-reduction" in r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--score 'bogus' is not allowed"):
        method_options("sparse24", {"score": "bogus"})
    with pytest.raises(UserError, match="--min-reduction"):
        method_options("welore", {"min_reduction": 1.5})
    assert method_options("dsformer", {"stf_steps": "3"})["stf_steps"] == 3


def test_attention_block_larger_than_max_length(tmp_path):
    _bad(["--attention", "combiner-fixed", "--attention-block", "1024", "--seq", "1:128:512"], tmp_path / "o",
         "--attention-block 1024 is larger than the maximum sequence length 512")


def test_attention_on_a_model_without_the_attention_interface(tmp_path, monkeypatch):
    from transformers import BertModel

    monkeypatch.setattr(BertModel, "_supports_attention_backend", False)
    _bad(["--model", "minilm", "--attention", "combiner-axial", "--no-eval", "--no-baseline"], tmp_path / "o",
         "--attention combiner-axial is not supported for BertModel")
