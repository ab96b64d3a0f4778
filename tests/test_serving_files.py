"""Build folders carry the files other stacks read, and no ORT-optimized graph that is larger than model.onnx."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from factordeploy.models.registry import load_model
from factordeploy.serve.hf_files import portable_config, portable_tokenizer_config, write_hf_files
from factordeploy.serve.ort_optimized import decide_ort_optimized

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Rotary embeddings need the right base frequency!",
         "def f(x): return x ** 2  # pydoc-like text"]


def test_portable_config_adds_flat_rope_keys():
    v5 = {"model_type": "llama", "dtype": "float32", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    out = portable_config(v5)
    assert out["rope_theta"] == 100000.0 and out["rope_scaling"] is None and out["torch_dtype"] == "float32"
    assert out["rope_parameters"] == v5["rope_parameters"]  # transformers 5 keeps reading its own key
    scaled = portable_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert scaled["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0} and scaled["rope_theta"] == 5e5
    assert "rope_theta" not in portable_config({"model_type": "bert"})


def test_portable_tokenizer_class():
    tc = portable_tokenizer_config({"tokenizer_class": "TokenizersBackend", "is_local": True}, ["input_ids", "attention_mask"])
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "is_local" not in tc
    assert tc["model_input_names"] == ["input_ids", "attention_mask"]
    assert portable_tokenizer_config({"tokenizer_class": "BertTokenizer"}, ["input_ids"])["tokenizer_class"] == "BertTokenizer"


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir"])
def test_written_folder_loads_back_identically(fixture, request, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    loaded = load_model(str(request.getfixturevalue(fixture)))
    info = write_hf_files(loaded, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == loaded.model.config.model_type
    if loaded.kind == "decoder":
        assert cfg["rope_theta"] == loaded.model.config.rope_parameters["rope_theta"]
        assert (tmp_path / "generation_config.json").is_file() and "generation_config.json" in info["files"]
        assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    else:
        assert not (tmp_path / "generation_config.json").exists()
    again = AutoConfig.from_pretrained(tmp_path)
    assert again.to_dict()["hidden_size"] == loaded.model.config.hidden_size
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert list(tok.model_input_names) == loaded.input_names
    for t in TEXTS:
        assert tok(t)["input_ids"] == loaded.tokenizer(t)["input_ids"], t
        assert set(tok(t)) == set(loaded.input_names)


def test_larger_ort_optimized_graph_is_removed(tmp_path):
    """A padded copy of a small graph is bigger than the original: it must not be left behind."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])
    g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, tmp_path / "model.onnx")
    big = onnx.ModelProto()
    big.CopyFrom(m)
    big.graph.initializer.append(numpy_helper.from_array(np.zeros(200_000, np.float32), "unused_padding"))
    onnx.save(big, tmp_path / "model.ort-optimized.onnx")
    d = decide_ort_optimized(tmp_path / "model.onnx", tmp_path / "model.ort-optimized.onnx", 1000,
                             batch=1, seq=8, rounds=1, runs_per_round=5)
    assert not d.kept and "larger" in d.reason
    assert not (tmp_path / "model.ort-optimized.onnx").exists()
    assert d.optimized_bytes > d.model_bytes and d.model_ms > 0 and d.optimized_ms > 0
    shutil.rmtree(tmp_path)
