"""The CombinerAttention node on ONNX Runtime: one custom node lowered by the generic pass to the op's body (the
torch reference traced once per attribute set) equals the reference at any length, with padding, and the body
keeps the cost sub-quadratic (no L x L tensor: its largest intermediate grows slower than L^2)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from factordeploy.ops import get_op
from factordeploy.ops.combiner_attention.lowering import op_attrs
from factordeploy.ops.combiner_attention.reference import CombinerConfig
from factordeploy.passes.pipeline import PassContext, run_pipeline
from factordeploy.passes.presets import ort_pipeline


def _single_node_model(attrs: dict, h: int, kvh: int, d: int) -> onnx.ModelProto:
    spec = get_op("CombinerAttention")
    f = np.float32
    q = gs.Variable("q", f, ["b", h, "L", d])
    k, v = gs.Variable("k", f, ["b", kvh, "L", d]), gs.Variable("v", f, ["b", kvh, "L", d])
    m = gs.Variable("key_mask", f, ["b", "L"])
    y = gs.Variable("y", f, ["b", h, "L", d])
    node = gs.Node(spec.name, "attn", attrs=spec.attr_values(attrs), inputs=[q, k, v, m], outputs=[y],
                   domain=spec.domain)
    graph = gs.Graph(nodes=[node], inputs=[q, k, v, m], outputs=[y], opset=18)
    model = gs.export_onnx(graph)
    model.opset_import.append(onnx.helper.make_opsetid(spec.domain, 1))
    return model


@pytest.mark.parametrize("pattern,causal", [("fixed", True), ("logsparse", True), ("logsparse", False),
                                            ("axial", False)])
def test_lowered_node_matches_reference(pattern, causal, tmp_path):
    h, kvh, d, B = 4, 2, 16, 4
    cfg = CombinerConfig(pattern, B, causal, h, kvh, d ** -0.5, max_len=64)
    lowered = run_pipeline(_single_node_model(op_attrs(cfg), h, kvh, d), ort_pipeline(),
                           PassContext(layers={}, target="ort"))
    assert all(n.domain != "factordeploy" for n in lowered.graph.node)
    ops = {n.op_type for n in lowered.graph.node}
    assert {"Softmax", "MatMul", "Pad"} <= ops and (pattern == "axial" or "ReduceMax" in ops)
    onnx.save(lowered, str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    g = torch.Generator().manual_seed(0)
    for L in (1, 4, 11, 37, 64):
        q, k, v = (torch.randn(2, n, L, d, generator=g) for n in (h, kvh, kvh))
        m = torch.ones(2, L)
        m[1, (L + 1) // 2:] = 0
        got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_mask": m.numpy()})[0]
        want = get_op("CombinerAttention").reference(q, k, v, m, **op_attrs(cfg))[0].numpy()
        keep = (L + 1) // 2
        np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(got[1, :, :keep], want[1, :, :keep], atol=2e-6, rtol=1e-5)


def test_lowered_body_is_sub_quadratic(tmp_path):
    """The biggest intermediate at L=1024 vs L=256 (fixed, B=32): 4x the length must cost < 16x the memory."""
    h, kvh, d, B = 2, 1, 16, 32
    cfg = CombinerConfig("fixed", B, True, h, kvh, d ** -0.5, max_len=1024)
    lowered = run_pipeline(_single_node_model(op_attrs(cfg), h, kvh, d), ort_pipeline(),
                           PassContext(layers={}, target="ort"))
    model = onnx.shape_inference.infer_shapes(lowered)
    typed = [vi for vi in model.graph.value_info if vi.type.tensor_type.elem_type]
    assert len(typed) > 50  # (nearly) every intermediate is visible to the check
    model.graph.output.extend(onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None)
                              for vi in typed)
    onnx.save(model, str(tmp_path / "all.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "all.onnx"))
    biggest = {}
    for L in (256, 1024):
        feeds = {"q": np.random.randn(1, h, L, d).astype(np.float32), "k": np.random.randn(1, kvh, L, d).astype(np.float32),
                 "v": np.random.randn(1, kvh, L, d).astype(np.float32), "key_mask": np.ones((1, L), np.float32)}
        biggest[L] = max(np.asarray(o).size for o in sess.run(None, feeds))
    assert biggest[1024] / biggest[256] < 8, biggest  # L^1.5 scaling gives 8x at most; L^2 would be 16x
