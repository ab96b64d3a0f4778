"""SparseDictMatMul kernels (Triton, CPU interpreter) and the TensorRT-RTX plugin build on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import importlib.util
from pathlib import Path

import onnx
import pytest
import torch

from factordeploy.compress.layers import SparseDictLinear

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def _layer(k, n_in, n_out, s, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(k, n_in, generator=g)
    idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(n_out)], 1)
    return SparseDictLinear(D, idx, torch.randn(s, n_out, generator=g),
                            torch.randn(n_out, generator=g) if bias else None)


# M, in, out, k, s: non-multiples of every block size (16, 32, 64), k above 256 (int16 indices), s = k
@pytest.mark.parametrize("shape", [(3, 33, 17, 20, 5), (37, 70, 130, 300, 45), (1, 64, 64, 48, 48), (18, 40, 65, 9, 3)])
def test_triton_kernel_matches_torch(shape):
    from factordeploy.ops.sparse_dict_matmul.kernel import sparse_dict_matmul

    M, n_in, n_out, k, s = shape
    layer = _layer(k, n_in, n_out, s, seed=M, bias=M % 2 == 1)
    x = torch.randn(2, M, n_in)
    with torch.no_grad():
        ref = layer(x)
        y = sparse_dict_matmul(x, layer.D, layer.idx, layer.val, layer.bias)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        # the int32 indices the TensorRT graph carries give the same result
        y32 = sparse_dict_matmul(x, layer.D, layer.idx.to(torch.int32), layer.val, layer.bias)
        torch.testing.assert_close(y32, ref, rtol=1e-4, atol=1e-4)


def test_plugin_spec_reference_and_launch_agree():
    from factordeploy.ops.sparse_dict_matmul import SPEC as spec

    layer = _layer(40, 24, 30, 6, seed=1, bias=False)
    x = torch.randn(2, 5, 24)
    idx32 = layer.idx.to(torch.int32)
    with torch.no_grad():
        ref = spec.reference(x, layer.D, idx32, layer.val)[0]
        torch.testing.assert_close(ref, layer(x), rtol=1e-5, atol=1e-5)
        out = torch.empty(2, 5, 30)
        spec.launch([x, layer.D.detach(), idx32, layer.val.detach()], [out], {"k": 40, "s": 6, "out_features": 30})()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    dims = spec.output_shapes([[2, 5, 24], [40, 24], [6, 30], [6, 30]], {}, __import__(
        "factordeploy.ops", fromlist=["IntAlgebra"]).IntAlgebra())
    assert dims == [[2, 5, 30]]


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx_bindings not installed")
def test_onnx_with_plugin_node_builds_tensorrt_rtx_engine(tmp_path):
    """The exported CoSpaDi layer -> trt_pipeline (node kept, int32 indices, plugin attributes) -> an
    engine built ahead of time on CPU with one plugin layer whose attributes reached the plugin."""
    from factordeploy.engines import trt_module as tm
    from factordeploy.engines.tensorrt import Range3, TrtBuildConfig, build_engine
    from factordeploy.passes.annotate import name_factorized
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import trt_pipeline
    from factordeploy.plugins.trt_plugin import CALLS, SEEN

    info = tm.resolve("trt-rtx")
    assert info is not None and info.can_build
    layer = _layer(40, 64, 48, 6, seed=2)

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = layer

        def forward(self, x):
            return torch.relu(self.l(x))

    b, s = torch.export.Dim("b", min=1, max=64), torch.export.Dim("s", min=1, max=512)
    raw = torch.onnx.export(M().eval(), (torch.randn(2, 8, 64),), dynamo=True, input_names=["x"], output_names=["y"],
                            dynamic_shapes={"x": {0: b, 1: s}}, opset_version=18, verbose=False).model_proto
    ctx = PassContext(layers={"l": layer.describe()}, target="trt")
    proto = run_pipeline(raw, trt_pipeline(), ctx)
    node = next(n for n in proto.graph.node if n.op_type == "SparseDictMatMul")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"factordeploy" and attrs["k"] == 40 and attrs["s"] == 6
    assert node.name == "fd/l/sparse_dict/SparseDictMatMul_0"
    idx_init = next(i for i in proto.graph.initializer if i.name == node.input[2])
    assert idx_init.data_type == onnx.TensorProto.INT32 and ctx.info["plugin-input-types"]["inputs_converted"] == 1
    onnx.save(proto, str(tmp_path / "m.trt.onnx"))
    # the same file runs on ONNX Runtime through the model-local function (one ONNX, both runtimes)
    import numpy as np
    import onnxruntime as ort

    assert [f.name for f in proto.functions] == ["SparseDictMatMul"]
    sess = ort.InferenceSession(str(tmp_path / "m.trt.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], torch.relu(layer(x)).numpy(), atol=1e-5)

    CALLS["SparseDictMatMul"].clear()
    SEEN["SparseDictMatMul"].clear()
    res = build_engine(tmp_path / "m.trt.onnx",
                       TrtBuildConfig(out_dir=tmp_path / "eng", batch=Range3(1, 2, 4), seq=Range3(1, 8, 16)), info)
    assert res.plugin_layers == 1 and Path(res.engine_path).exists()  # the plugin, not the function body
    seen = SEEN["SparseDictMatMul"]
    assert seen["attrs"] == {"k": 40, "s": 6, "out_features": 48}
    conf = seen["configured"]
    assert conf["inputs"][0]["opt"] == (2, 8, 64) and conf["outputs"][0]["opt"] == (2, 8, 48)
    assert [d["type"] for d in conf["inputs"]] == ["float32", "float32", "int32", "float32"]
    blob = Path(res.engine_path).read_bytes()
    assert blob.count(b"SparseDictMatMul") >= 1
