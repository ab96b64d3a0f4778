"""`deploy generate`: greedy decoding from a built folder is token-identical to torch's generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from factordeploy.cli import main
from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.targets import find_targets
from factordeploy.models import load_model
from factordeploy.serve.generate import SamplingConfig, choose, generate_ids, open_folder
from factordeploy.serve.runners import TorchStepRunner

PROMPTS = ["The history of the city", "In 1990, the company", "Water boils at",
           "def add(a, b):", "She opened the door and"]


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory):
    """A real `deploy build` of the tiny Llama (svd 0.5; deterministic, so the test can redo it in torch)."""
    out = tmp_path_factory.mktemp("gen") / "tiny-svd"
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_llama_dir), "--method", "svd", "--ratio", "0.5",
                                  "--out", str(out), "--no-eval", "--no-baseline", "--backend", "ort", "--quiet"])
    assert r.exit_code == 0, r.output
    loaded = load_model(str(tiny_llama_dir))
    get_method("svd").compress(loaded.model, find_targets(loaded.model), CompressContext(ratio=0.5))
    return out, loaded


def test_greedy_is_token_identical_to_torch_generate(built):
    out, loaded = built
    served = open_folder(out)
    cfg = SamplingConfig(max_new_tokens=12, eos_ids=served.eos_ids)
    torch_runner = TorchStepRunner(loaded.model)
    for prompt in PROMPTS:
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=12, do_sample=False, eos_token_id=list(served.eos_ids),
                                        pad_token_id=loaded.tokenizer.pad_token_id)[0, len(ids):].tolist()
        got = served.generate(prompt, cfg)
        assert got.new_ids == ref, prompt
        assert generate_ids(torch_runner, ids, cfg).new_ids == ref  # the same loop on torch
        assert got.text == loaded.tokenizer.decode(ref, skip_special_tokens=True)


def test_cli_generate_prints_text_and_json(built):
    out, _ = built
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                                  "--max-new-tokens", "5", "--json", "--ignore-eos"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS[:2]
    assert all(row["new_tokens"] == 5 and row["tokens_per_s"] > 0 for row in rows)
    served = open_folder(out)
    assert rows[0]["new_ids"] == served.generate(PROMPTS[0], SamplingConfig(max_new_tokens=5, ignore_eos=True)).new_ids


def test_sampling_is_seeded_and_top_p_restricts_the_support(built):
    out, _ = built
    served = open_folder(out)
    s1 = served.generate(PROMPTS[2], SamplingConfig(max_new_tokens=8, sample=True, temperature=1.5, seed=3, ignore_eos=True))
    s2 = served.generate(PROMPTS[2], SamplingConfig(max_new_tokens=8, sample=True, temperature=1.5, seed=3, ignore_eos=True))
    greedy = served.generate(PROMPTS[2], SamplingConfig(max_new_tokens=8, ignore_eos=True))
    tiny_p = served.generate(PROMPTS[2], SamplingConfig(max_new_tokens=8, sample=True, top_p=1e-6, seed=3, ignore_eos=True))
    assert s1.new_ids == s2.new_ids
    assert tiny_p.new_ids == greedy.new_ids  # nucleus of one token = argmax
    assert s1.new_ids != greedy.new_ids  # a random model at temperature 1.5 does not follow argmax for 8 tokens


def test_choose_samples_softmax_with_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = np.array([choose(logits, SamplingConfig(sample=True), rng) for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top = np.array([choose(logits, SamplingConfig(sample=True, top_p=0.7), rng) for _ in range(2000)])
    assert set(top.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7: the last two are cut
    np.testing.assert_allclose(np.mean(top == 0), 0.5 / 0.8, atol=0.04)


@pytest.mark.parametrize("case", ["missing", "empty", "encoder"])
def test_bad_folder_is_one_line_error(case, tmp_path):
    folder = tmp_path / "x"
    if case == "empty":
        folder.mkdir()
    if case == "encoder":  # a graph without past_key_values.* inputs
        import onnx
        from onnx import TensorProto, helper

        folder.mkdir()
        g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])], "enc",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, ["b", "s"])])
        onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx"))
    r = CliRunner().invoke(main, ["generate", str(folder), "--prompt", "hi"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Fix:" in lines[0], r.output
    assert {"missing": "not found", "empty": "has no model.onnx", "encoder": "no KV-cache inputs"}[case] in lines[0]


def test_bad_sampling_options_are_one_line_errors(built):
    out, _ = built
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt", "hi", "--sample", "--top-p", "0"])
    assert r.exit_code == 2 and "--top-p" in r.output and len(r.output.strip().splitlines()) == 1


def test_prompt_plus_new_tokens_past_the_positions_is_one_line(built):
    """The tiny Llama has 512 positions: --max-new-tokens 512 is refused from config.json alone, and a
    prompt whose tokens plus --max-new-tokens pass them before the first prompt is generated."""
    out, _ = built
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt", "hi", "--max-new-tokens", "512"])
    assert r.exit_code == 2 and "--max-new-tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt", "hi", "--prompt", "word " * 500,
                                  "--max-new-tokens", "100"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "positions" in lines[0] and r.stdout == "", r.output
