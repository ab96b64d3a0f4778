"""2:4 sparsity and DSFormer: mask after pruning / STF / export / passes, SparseGPT, STE gradient, bytes."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.layers import (DenseSparseLinear, Sparse24Linear, check_24, mask_24, project_24,
                                          sparse24_bytes, validate_24_layers, violations_24)
from factordeploy.compress.linalg import output_error
from factordeploy.compress.methods.dsformer import (STFLinear, dsformer_bytes, dsformer_rank, init_factors,
                                                    refit_dense, ste_project_24)
from factordeploy.compress.methods.sparse24 import magnitude_prune, sparsegpt_prune, wanda_prune
from factordeploy.errors import UserError


def test_projection_keeps_two_largest_of_each_group():
    W = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.0, 0.1, -0.2, 0.3]])
    P = project_24(W)
    assert torch.equal(P, torch.tensor([[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -0.2, 0.3]]))
    assert violations_24(P) == 0 and violations_24(W) == 2
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        check_24(W, "w")
    with pytest.raises(ValueError, match="divisible by 4"):
        check_24(torch.ones(2, 6), "w")


def test_layers_validate_on_construction_and_load():
    W = project_24(torch.randn(8, 16))
    lay = Sparse24Linear(W, torch.zeros(8))
    bad = lay.state_dict()
    bad["weight"] = torch.randn(8, 16)
    with pytest.raises(ValueError, match="not 2:4"):
        lay.load_state_dict(bad)
    with pytest.raises(ValueError):
        Sparse24Linear(torch.randn(8, 16))
    with pytest.raises(ValueError):
        DenseSparseLinear(torch.randn(8, 4), torch.randn(4, 16))
    x = torch.randn(3, 16)
    ds = DenseSparseLinear(torch.randn(8, 4), project_24(torch.randn(4, 16)), torch.ones(8))
    torch.testing.assert_close(ds(x), x @ ds.dense_weight().T + 1)


def test_byte_accounting_by_hand():
    # 384 x 384 fp32 at 2:4: 73,728 kept values x 4 B + 73,728 x 2 bit / 8 = 294,912 + 18,432.
    assert Sparse24Linear(project_24(torch.randn(384, 384))).stored_bytes() == 313_344
    assert sparse24_bytes(384, 384, 2) == 147_456 + 18_432  # fp16: 43.75% saved
    # DSFormer at ratio 0.5: budget 294,912 B. k=125: D 384*125*4 = 192,000; S 125x384 keeps 24,000
    # values: 96,000 + 6,000 = 102,000; total 294,000 <= budget, k=126 would be 296,352 > budget.
    assert dsformer_rank(384, 384, 0.5) == 125
    assert dsformer_bytes(384, 384, 125) == 294_000 and dsformer_bytes(384, 384, 126) == 296_352
    ds = DenseSparseLinear(torch.randn(384, 125), project_24(torch.randn(125, 384)))
    assert ds.stored_bytes() == 294_000


def test_ste_projection_has_straight_through_gradient():
    torch.manual_seed(0)
    S = torch.randn(6, 16, requires_grad=True)
    C = torch.randn(6, 16)
    out = ste_project_24(S)
    assert torch.equal(out, project_24(S.detach()))
    (out * C).sum().backward()
    assert torch.equal(S.grad, C)  # identity: pruned positions get gradient too
    S2 = S.detach().clone().requires_grad_(True)
    (project_24(S2) * C).sum().backward()  # the plain masked product would zero half of it
    assert int((S2.grad == 0).sum()) == S.numel() // 2


def test_stf_steps_keep_mask_and_final_layer_matches():
    torch.manual_seed(0)
    W = torch.randn(12, 16)
    D, S = init_factors(W, 8)
    m = STFLinear(D, S, torch.zeros(12))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    target = x @ W.T
    losses = []
    for _ in range(30):
        loss = ((m(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert violations_24(m.S.detach()) > 0  # the latent is dense...
    final = m.final()
    final.validate()  # ...the deployed factor is 2:4
    torch.testing.assert_close(final(x), m(x))


def test_refit_is_least_squares_optimum():
    torch.manual_seed(1)
    W, X = torch.randn(10, 16, dtype=torch.float64), torch.randn(200, 16, dtype=torch.float64)
    S = project_24(torch.randn(6, 16, dtype=torch.float64))
    D = refit_dense(W, S, X.T @ X, ridge=0.0)
    ref = torch.linalg.lstsq(X @ S.T, X @ W.T).solution.T
    torch.testing.assert_close(D, ref)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    torch.manual_seed(0)
    W = torch.randn(16, 32)
    out = sparsegpt_prune(W, torch.eye(32, dtype=torch.float64), blocksize=8, damp=0.0).float()
    torch.testing.assert_close(out, magnitude_prune(W))
    # Wanda with equal column norms is magnitude pruning as well.
    torch.testing.assert_close(wanda_prune(W, 3 * torch.eye(32, dtype=torch.float64)), magnitude_prune(W))


@pytest.fixture(scope="module")
def minilm_own():
    """A MiniLM of this module's own (tests here replace its layers; never the session-wide one)."""
    from factordeploy.models.registry import load_model
    return load_model("minilm")


@pytest.mark.slow
def test_sparsegpt_beats_magnitude_on_real_layer(minilm_own):
    minilm = minilm_own
    from factordeploy.compress.calibration import Calibration, CalibrationConfig

    cal = Calibration(minilm, CalibrationConfig(n=16, length=128))
    name = "encoder.layer.2.intermediate.dense"
    G = cal.grams(minilm.model, [name])[name]
    W = minilm.model.get_submodule(name).weight.detach()
    errs = {k: output_error(W, f(W), G) for k, f in {
        "magnitude": magnitude_prune, "wanda": lambda w: wanda_prune(w, G),
        "sparsegpt": lambda w: sparsegpt_prune(w, G).float()}.items()}
    for k in ("wanda", "sparsegpt"):
        assert violations_24({"wanda": wanda_prune(W, G), "sparsegpt": sparsegpt_prune(W, G)}[k]) == 0
    assert errs["sparsegpt"] < 0.8 * errs["magnitude"], errs
    assert errs["wanda"] < errs["magnitude"], errs


@pytest.mark.slow
def test_mask_survives_pruning_stf_export_and_passes(minilm_own, tmp_path):
    """Real MiniLM: sparse24 on blocks 0-2, dsformer (2 STF steps) on blocks 3-5, export, passes."""
    from factordeploy.compress.calibration import Calibration, CalibrationConfig
    from factordeploy.compress.targets import find_targets
    from factordeploy.export import export_onnx
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline
    from factordeploy.passes.sparsity import verify

    minilm = minilm_own
    model = minilm.model
    targets = find_targets(model)
    first = [t for t in targets if t.split(".")[2] in "012"]
    second = [t for t in targets if t not in first]
    cal = Calibration(minilm, CalibrationConfig(n=8, length=64))
    r1 = get_method("sparse24").compress(model, first, CompressContext(0.5, options={"score": "sparsegpt"}, calibration=cal))
    r2 = get_method("dsformer").compress(model, second, CompressContext(
        0.5, options={"stf_steps": 2, "stf_batch": 4, "stf_lr": 1e-3, "stf_checkpoint": str(tmp_path / "ckpt")},
        calibration=cal))
    assert validate_24_layers(model) == len(targets)  # after pruning and after STF steps
    assert (tmp_path / "ckpt" / "trainer.pt").exists()
    assert r2.extra["stf_loss_first_last"][0] > 0

    path = tmp_path / "m.onnx"
    export_onnx(minilm, model, path)
    layers = {r.name: r.after for r in r1.layers + r2.layers}
    ctx = PassContext(layers=layers)
    proto = run_pipeline(onnx.load(str(path)), ort_pipeline(), ctx)
    assert ctx.info["verify-2to4"]["layers_2to4"] == len(targets)
    # ...and after the TensorRT pipeline's bf16 cast (fp16 behaves the same way).
    from factordeploy.passes.presets import trt_pipeline
    tctx = PassContext(layers=layers, target="trt")
    run_pipeline(onnx.load(str(path)), trt_pipeline("bf16"), tctx)
    assert tctx.info["verify-2to4"]["layers_2to4"] == len(targets)

    # The exported constant is W^T [in, out], 2:4 along axis 0 (K), exactly the torch weight.
    lay = model.get_submodule(first[0])
    init = {t.name: t for t in proto.graph.initializer}
    mm = next(n for n in proto.graph.node if n.name.startswith(f"fd/{first[0]}/sparse24/") and n.op_type == "MatMul")
    B = torch.from_numpy(numpy_helper.to_array(init[mm.input[1]]).copy())
    torch.testing.assert_close(B, lay.weight.detach().T)
    assert violations_24(B, dim=0) == 0

    # Break one layer's pattern in the graph: the pass names it.
    arr = numpy_helper.to_array(init[mm.input[1]]).copy()
    arr[:] = 1.0
    init[mm.input[1]].CopyFrom(numpy_helper.from_array(arr, mm.input[1]))
    with pytest.raises(UserError, match=first[0].replace(".", r"\.")):
        verify(proto, PassContext(layers=layers))


def test_trt_log_sparsity_lines_ignore_layer_names():
    from factordeploy.engines.tensorrt import is_sparsity_line

    assert not is_sparsity_line("[X] Parsing node: fd/encoder.layer.0.attention.self.query/densesparse/MatMul_0 [MatMul]")
    assert not is_sparsity_line("[V] Registering layer: fd/model.layers.0.mlp.up_proj/sparse24/MatMul_0")
    assert is_sparsity_line("[V] (Sparsity) Layers eligible for sparse math: fd/a/sparse24/MatMul_0, fd/b/sparse24/MatMul_0")
    assert is_sparsity_line("[V] (Sparsity) TRT inference plan picked sparse implementation for layers: fd/a/sparse24/MatMul_0")
