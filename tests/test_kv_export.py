"""Decoders export with a KV cache (Optimum's with-past signature); every layer kind survives it.

Reference: the torch model's FULL forward without a cache. ONNX Runtime runs a prefill with
past length 0 and then cached decode steps, feeding its own present tensors back as past.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.compress.targets import find_targets
from factordeploy.engines import ort as ortmod
from factordeploy.export import export_onnx
from factordeploy.export.kv_cache import TOTAL, CacheSpec, step_inputs
from factordeploy.models import load_model
from factordeploy.passes.pipeline import PassContext, run_pipeline
from factordeploy.passes.presets import ort_pipeline
from factordeploy.ops.sparse_dict_matmul import SPEC
from factordeploy.verify.fidelity import check_plan, compare_torch_onnx

OP = SPEC.name

# One model carries every layer kind (one export: torch.export of a decoder is slow on 2 cores).
GROUPS = {"svd": ("*q_proj", "*k_proj"), "cospadi": ("*v_proj", "*o_proj"),
          "sparse24": ("*gate_proj",), "dsformer": ("*up_proj", "*down_proj")}
OPTIONS = {"svd": {}, "cospadi": {"atoms": 16, "sparsity": 4}, "sparse24": {"score": "magnitude"},
           "dsformer": {"stf_steps": 0}}


@pytest.fixture(scope="module")
def mixed(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with low-rank, sparse-dictionary, 2:4 and dense x 2:4 layers, exported once."""
    loaded = load_model(str(tiny_llama_dir))
    layers = {}
    for method, patterns in GROUPS.items():
        ctx = CompressContext(ratio=0.5, options=dict(OPTIONS[method]))
        if get_method(method).uses_calibration(ctx.options):
            ctx.calibration = Calibration(loaded, CalibrationConfig(n=4, length=32, seed=0))
        res = get_method(method).compress(loaded.model, find_targets(loaded.model, patterns), ctx)
        layers |= {r.name: r.after for r in res.layers if r.after["kind"] != "dense"}
    assert {v["kind"] for v in layers.values()} == {"lowrank", "sparse_dict", "sparse24", "densesparse"}
    loaded.model.eval()
    d = tmp_path_factory.mktemp("kv")
    exp = export_onnx(loaded, loaded.model, d / "raw.onnx")
    paths = {}
    for policy in ("cost", "gather", "dense"):
        proto = run_pipeline(onnx.load(str(d / "raw.onnx")), ort_pipeline({OP: policy}), PassContext(layers=layers))
        paths[policy] = d / f"model-{policy}.onnx"
        onnx.save_model(proto, str(paths[policy]))
    return loaded, exp, paths


def _full_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("policy", ["cost", "gather", "dense"])
def test_prefill_and_decode_match_full_forward(mixed, policy):
    loaded, exp, paths = mixed
    path = paths[policy]
    spec = CacheSpec.from_config(loaded.model.config)
    assert exp.inputs == spec.input_names and exp.outputs == spec.output_names
    sess = ortmod.session(path)
    assert [i.name for i in sess.get_inputs()] == spec.input_names
    assert [o.name for o in sess.get_outputs()] == spec.output_names
    ids = loaded.example_inputs(2, 14)["input_ids"].numpy()
    ref = _full_logits(loaded.model, ids)
    n0 = 9  # prompt; then 5 single-token cached steps
    mask = np.ones((2, n0), np.int64)
    feeds = step_inputs(ids[:, :n0], mask) | spec.empty_past(2)
    out = dict(zip(spec.output_names, sess.run(None, feeds)))
    np.testing.assert_allclose(out["logits"], ref[:, :n0], atol=2e-4, rtol=1e-3)
    assert out["present.0.key"].shape == (2, spec.kv_heads, n0, spec.head_dim)
    for t in range(n0, ids.shape[1]):
        mask = np.ones((2, t + 1), np.int64)
        feeds = step_inputs(ids[:, t:t + 1], mask) | spec.past_from_present(out)
        out = dict(zip(spec.output_names, sess.run(None, feeds)))
        np.testing.assert_allclose(out["logits"][:, -1], ref[:, t], atol=2e-4, rtol=1e-3)
        assert out["present.1.value"].shape[2] == t + 1


def test_signature_names_and_axes_are_optimums(mixed):
    g = onnx.load(str(mixed[2]["cost"])).graph
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in g.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", TOTAL]
    assert dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert len(g.input) == 3 + 2 * 2 and [o.name for o in g.output][:3] == ["logits", "present.0.key", "present.0.value"]


def test_left_padded_batch_decodes_like_each_prompt_alone(mixed):
    loaded, _, paths = mixed
    path = paths["cost"]
    spec = CacheSpec.from_config(loaded.model.config)
    sess = ortmod.session(path)
    ids = loaded.example_inputs(2, 8)["input_ids"].numpy()
    short = ids[1:, 3:]  # 5 tokens, left-padded to 8 in the batch
    batch = np.concatenate([ids[:1], np.pad(short, ((0, 0), (3, 0)))], axis=0)
    mask = np.concatenate([np.ones((1, 8), np.int64), np.pad(np.ones((1, 5), np.int64), ((0, 0), (3, 0)))])
    out = dict(zip(spec.output_names, sess.run(None, step_inputs(batch, mask) | spec.empty_past(2))))
    np.testing.assert_allclose(out["logits"][1, -1], _full_logits(loaded.model, short)[0, -1], atol=2e-4, rtol=1e-3)


def test_export_check_runs_prefill_and_decode_steps_and_catches_a_wrong_graph(mixed):
    loaded, _, paths = mixed
    path = paths["cost"]
    plan = check_plan(loaded, loaded.model, decode_steps=3)
    assert len(plan.feeds) == 2 * 4  # two prompt batches x (prefill + 3 steps)
    assert [f["past_key_values.0.key"].shape[2] for f in plan.feeds[:4]] == [0, 32, 33, 34]
    ok = compare_torch_onnx(plan.fn, str(path), plan.feeds, plan.input_names, plan.output_names, atol=1e-3, rtol=1e-3)
    assert ok.passed and ok.max_abs < 1e-3
    # the check must be able to fail: a torch reference that differs in one layer
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.A.mul_(1.5)  # changes present.1.key, then the logits
    bad = check_plan(loaded, model, decode_steps=1)
    res = compare_torch_onnx(bad.fn, str(path), bad.feeds, bad.input_names, bad.output_names, atol=1e-3, rtol=1e-3)
    assert not res.passed



def test_tensorrt_profile_covers_past_length_zero_to_max():
    """A KV-cache graph's TensorRT profile: past axis 0..seq max, mask axis past + sequence."""
    from types import SimpleNamespace

    from factordeploy.engines.tensorrt import Range3, TrtBuildConfig, _profile_shapes

    ins = [SimpleNamespace(name="input_ids", shape=(-1, -1)), SimpleNamespace(name="attention_mask", shape=(-1, -1)),
           SimpleNamespace(name="position_ids", shape=(-1, -1)),
           SimpleNamespace(name="past_key_values.0.key", shape=(-1, 2, -1, 16))]
    net = SimpleNamespace(num_inputs=len(ins), get_input=lambda i: ins[i])
    cfg = TrtBuildConfig(out_dir=".", batch=Range3(1, 2, 4), seq=Range3(1, 64, 256))
    shapes = _profile_shapes(net, cfg)
    assert shapes["past_key_values.0.key"] == {"min": [1, 2, 0, 16], "opt": [2, 2, 64, 16], "max": [4, 2, 256, 16]}
    assert shapes["attention_mask"] == {"min": [1, 1], "opt": [2, 128], "max": [4, 512]}
    assert shapes["input_ids"] == {"min": [1, 1], "opt": [2, 64], "max": [4, 256]}
