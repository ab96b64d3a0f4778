"""SparseMatMul (SLTrain's S): export as one node, the ORT lowering and its cost choice, the Triton
kernel under TRITON_INTERPRET=1, and the TensorRT-RTX plugin engine built on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from factordeploy.compress.layers import SparsePlusLowRankLinear

from .layer_export import Wrap, export_layer

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def _layer(o=48, i=40, r=5, nnz=70, seed=0, bias=True, scale=1.0) -> SparsePlusLowRankLinear:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(o * i, generator=g)[:nnz].sort().values
    return SparsePlusLowRankLinear(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), idx,
                                   torch.randn(nnz, generator=g), torch.randn(o, generator=g) if bias else None,
                                   scale=scale)


# M, in, out, nnz: non-multiples of the block sizes (16, 128), an empty row set, a dense-ish S
@pytest.mark.parametrize("shape", [(3, 33, 17, 20), (37, 70, 130, 900), (1, 64, 64, 4096), (18, 40, 65, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_reference(shape, dtype):
    from factordeploy.ops import get_op
    from factordeploy.ops.sparse_matmul.kernel import sparse_matmul

    M, n_in, n_out, nnz = shape
    g = torch.Generator().manual_seed(M)
    idx = torch.randperm(n_in * n_out, generator=g)[:nnz].sort().values.to(torch.int32)
    val = torch.randn(nnz, generator=g)
    x = torch.randn(2, M, n_in, generator=g)
    S = torch.zeros(n_out * n_in).index_put_((idx.long(),), val).view(n_out, n_in)
    want = x @ S.T  # by hand, not through the op's reference
    ref = get_op("SparseMatMul").reference(x, idx, val, in_features=n_in, out_features=n_out)[0]
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    y = sparse_matmul(x.to(dtype), idx, val.to(dtype), n_out)
    assert y.dtype == dtype and y.shape == (2, M, n_out)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), (x.to(dtype).float() @ S.to(dtype).float().T), rtol=tol, atol=tol)


def test_spec_launch_writes_into_the_given_output():
    from factordeploy.ops import IntAlgebra, get_op

    spec = get_op("SparseMatMul")
    layer = _layer(bias=False)
    x = torch.randn(2, 5, 40)
    out = torch.full((2, 5, 48), 7.0)  # garbage the launch must overwrite
    attrs = {"in_features": 40, "out_features": 48}
    with torch.no_grad():
        spec.launch([x, layer.idx, layer.val.detach()], [out], attrs)()
        torch.testing.assert_close(out, x @ layer.sparse_weight().T, rtol=1e-4, atol=1e-4)
    assert spec.output_shapes([[2, 5, 40], [70], [70]], spec.attr_values(attrs), IntAlgebra()) == [[2, 5, 48]]


def test_export_keeps_one_node_and_ort_lowering_matches_torch(tmp_path):
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline

    layer = _layer(scale=2.5)
    raw = export_layer(layer)
    assert [n.op_type for n in raw.graph.node].count("SparseMatMul") == 1
    node = next(n for n in raw.graph.node if n.op_type == "SparseMatMul")
    idx_init = next(t for t in raw.graph.initializer if t.name == node.input[1])
    assert idx_init.data_type == onnx.TensorProto.INT32 and list(idx_init.dims) == [70]
    ctx = PassContext(layers={"l": layer.describe()})
    proto = run_pipeline(raw, ort_pipeline(), ctx)
    log = ctx.info["lower-custom-ops"]["ops"]["SparseMatMul"]
    assert log["gather"] == 1 and log["dense"] == 0 and list(log["per_layer"]["l"]["modelled_us"]) == ["gather"]
    ops = [n.op_type for n in proto.graph.node]
    assert "SparseMatMul" not in ops and {"Gather", "ReduceSum", "Unique"} <= set(ops)  # the row-padded gather form
    # on disk: the low-rank factors, the int32 indices and the values - no dense S or W
    sizes = sorted(int(np.prod(t.dims)) for t in proto.graph.initializer if len(t.dims) and np.prod(t.dims) > 8)
    assert sizes == sorted([40 * 5, 5 * 48, 70, 70, 48])
    onnx.save(proto, str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(3, 7, 40), (1, 1, 40)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], Wrap(layer)(x).numpy(), rtol=1e-5, atol=1e-4)


def _ort_lowered(layer, tmp_path, name="m.onnx") -> str:
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline

    proto = run_pipeline(export_layer(layer), ort_pipeline(), PassContext(layers={"l": layer.describe()}))
    onnx.save(proto, str(tmp_path / name))
    return str(tmp_path / name)


@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_ort_lowering_is_exact_with_several_threads(tmp_path, level):
    """Rows holding many nonzeros, 2 intra-op threads, repeated runs: every run equals the reference.

    The first lowering scattered the (nnz, tokens) products with ScatterND(reduction=add), which ONNX
    Runtime's CPU kernel splits over its threads without atomics: here 19 of 20 runs lost updates
    (max abs error 58), and MiniLM's SLTrain build failed its export check (max abs 0.0116)."""
    g = torch.Generator().manual_seed(0)
    o, i, nnz = 4, 2048, 4000  # ~1000 nonzeros per output row: concurrent adds to one row are certain
    idx = torch.randperm(o * i, generator=g)[:nnz].sort().values
    layer = SparsePlusLowRankLinear(torch.zeros(1, i), torch.zeros(o, 1), idx, torch.randn(nnz, generator=g), None)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(_ort_lowered(layer, tmp_path), so, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 64, i, generator=g)
    with torch.no_grad():
        want = torch.relu(x.double() @ layer.sparse_weight().double().T).numpy()
    errs = [float(np.abs(sess.run(None, {"x": x.numpy()})[0] - want).max()) for _ in range(10)]
    assert max(errs) < 1e-3, errs


def test_ort_folds_the_layout_and_handles_an_empty_support(tmp_path):
    """ORT folds the ELL layout at session creation (no Unique / ScatterND left per call); S = 0 works."""
    layer = _layer(nnz=70)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(_ort_lowered(layer, tmp_path), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"Gather", "ReduceSum"} <= ops and not ops & {"Unique", "ScatterND", "Range", "Div", "Mod"}
    empty = _layer(nnz=0)
    sess = ort.InferenceSession(_ort_lowered(empty, tmp_path, "e.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], Wrap(empty)(x).numpy(), rtol=1e-5, atol=1e-5)


def test_cost_choice_keeps_the_artifact_compressed():
    import numpy as np

    from factordeploy.ops.sparse_matmul.lowering import costs, layer_costs

    attrs = {"in_features": 384, "out_features": 1536}
    nnz = round(0.03 * 384 * 1536)
    # SLTrain density 3%: the dense refold is modelled faster on a CPU GEMM at 128 tokens, but it would
    # store 384*1536 values (12.5x the sparse form's bytes): the cost policy is not offered it
    c = layer_costs(384, 1536, nnz)
    assert c["dense"]["seconds"] < c["gather"]["seconds"]
    assert c["dense"]["bytes"] == 384 * 1536 * 4 and c["gather"]["bytes"] == nnz * 8
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(384 * 1536, nnz, replace=False)).astype(np.int32)
    assert list(costs([None, idx, np.zeros(nnz, np.float32)], attrs)) == ["gather"]
    # a half-dense S stores no more as a dense matrix: both are offered and dense is the faster
    half_idx = np.sort(rng.choice(384 * 1536, 384 * 1536 // 2, replace=False)).astype(np.int32)
    half = costs([None, half_idx, np.zeros(half_idx.size, np.float32)], attrs)
    assert set(half) == {"gather", "dense"} and min(half, key=half.get) == "dense"


def test_dense_lowering_matches_torch(tmp_path):
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline

    layer = _layer()
    ctx = PassContext(layers={"l": layer.describe()})
    proto = run_pipeline(export_layer(layer), ort_pipeline({"SparseMatMul": "dense"}), ctx)
    assert "ScatterND" not in [n.op_type for n in proto.graph.node]
    assert any(tuple(t.dims) == (40, 48) for t in proto.graph.initializer)  # the refolded S^T
    assert ctx.info["lower-custom-ops"]["ops"]["SparseMatMul"]["dense"] == 1
    onnx.save(proto, str(tmp_path / "d.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], Wrap(layer)(x).numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx_bindings not installed")
def test_onnx_with_sparse_matmul_builds_tensorrt_rtx_engine(tmp_path):
    """The exported SLTrain layer -> trt_pipeline (node kept, plugin attributes) -> an engine built
    ahead of time on CPU with one plugin layer whose attributes and shapes reached the plugin."""
    from factordeploy.engines import trt_module as tm
    from factordeploy.engines.tensorrt import Range3, TrtBuildConfig, build_engine
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import trt_pipeline
    from factordeploy.plugins.trt_plugin import CALLS, SEEN

    info = tm.resolve("trt-rtx")
    assert info is not None and info.can_build
    layer = _layer()
    proto = run_pipeline(export_layer(layer), trt_pipeline(), PassContext(layers={"l": layer.describe()}, target="trt"))
    node = next(n for n in proto.graph.node if n.op_type == "SparseMatMul")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"factordeploy" and attrs["in_features"] == 40 and attrs["out_features"] == 48
    assert node.name == "fd/l/sparse_lowrank/SparseMatMul_2"  # after the two low-rank MatMuls
    onnx.save(proto, str(tmp_path / "m.trt.onnx"))
    CALLS["SparseMatMul"].clear()
    SEEN["SparseMatMul"].clear()
    res = build_engine(tmp_path / "m.trt.onnx",
                       TrtBuildConfig(out_dir=tmp_path / "eng", batch=Range3(1, 2, 4), seq=Range3(1, 8, 16)), info)
    assert res.plugin_layers == 1 and Path(res.engine_path).exists()
    seen = SEEN["SparseMatMul"]
    assert seen["attrs"] == {"in_features": 40, "out_features": 48}
    conf = seen["configured"]
    assert conf["inputs"][0]["opt"] == (2, 8, 40) and conf["outputs"][0]["opt"] == (2, 8, 48)
    assert [d["type"] for d in conf["inputs"]] == ["float32", "int32", "float32"]
    assert Path(res.engine_path).read_bytes().count(b"SparseMatMul") >= 1
