"""The sparse-dictionary op on ONNX Runtime: its standard-op body, the dense refold, and their cost model.

ONNX Runtime has no kernel for the op, so each node becomes one of two standard-op forms:

* ``gather`` (the op's body, also shipped as the ONNX model-local function): z = MatMul(x, D^T)
  (k features), tokens moved last, Gather(z^T, idx, axis=0) (s, out, tokens) -> Mul(val) ->
  ReduceSum(axis=0) -> back to (..., out). Every node after the first MatMul reads the activation,
  so no constant folding can rebuild the dense W; the all-constant nodes (Transpose(D), Cast(idx ->
  int64), Unsqueeze(val)) are folded by ORT at session creation: on disk D and the 1-2 byte indices
  keep their stored form. Shapes come from Shape ops, so one function serves every layer.
* ``dense``: one constant W^T = (S D)^T (in x out) and MatMul(x, W^T): the refold. Fastest for
  large token counts on a CPU GEMM, but stores the full dense matrix again.

The choice is per node by a modelled cost at a reference token count M (roofline: max(FLOPs / peak,
bytes moved / bandwidth) summed over the nodes), so it can differ between square attention
projections and wide FFN layers; the generic lowering pass logs every decision with both costs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..body import Body, constant_values
from ..cost import CostModel


def layer_costs(in_f: int, out_f: int, k: int, s: int, idx_bytes: int, model: CostModel,
                elem: int = 4) -> dict[str, float]:
    """Modelled seconds of each lowering for M = model.tokens rows."""
    M = model.tokens
    dense = model.time(2 * M * in_f * out_f, elem * (in_f * out_f + M * (in_f + out_f)))
    # MatMul by D^T, then Gather -> Mul -> ReduceSum each pass over the (s, out, M) intermediate.
    gather = (model.time(2 * M * in_f * k, elem * (in_f * k + M * (in_f + k)) + s * out_f * (idx_bytes + elem))
              + 3 * M * s * out_f / model.elementwise_per_s)
    return {"dense": dense, "gather": gather}


def costs(consts: list, attrs: dict, model: CostModel | None = None) -> dict[str, float]:
    """OpSpec.cost: modelled seconds per lowering from the node's constant D and idx."""
    _x, D, idx, _val = consts
    if D is None or idx is None:
        raise ValueError("the sparse-dictionary op needs constant D and idx to be costed")
    k, in_f = D.shape
    s, out_f = idx.shape
    return layer_costs(in_f, out_f, k, s, idx.dtype.itemsize, model or CostModel(), D.dtype.itemsize)


def body(b: Body, inputs: list, outputs: list, attrs: dict | None) -> None:
    """The gather form, written once: the ORT lowering and the model-local function."""
    x, D, idx, val = inputs
    y = outputs[0]
    ft, i64 = y.dtype, np.int64
    c0, c1, c2, m1 = (b.const(n, np.array([v], dtype=i64)) for n, v in (("c0", 0), ("c1", 1), ("c2", 2), ("m1", -1)))
    # Tokens as the LAST axis, so Gather copies whole contiguous rows (axis 0): 5x faster in
    # ORT than gathering along the feature axis.
    dt = b.op("Transpose", [D], "D_T", {"perm": [1, 0]}, ft)
    z = b.op("MatMul", [x, dt], "z", dtype=ft)
    k_dim = b.op("Slice", [b.op("Shape", [D], "D_shape", dtype=i64), c0, c1], "k_dim", dtype=i64)
    z2 = b.op("Reshape", [z, b.op("Concat", [m1, k_dim], "flat_shape", {"axis": 0}, i64)], "z2", dtype=ft)
    zt = b.op("Transpose", [z2], "zT", {"perm": [1, 0]}, ft)
    ind = b.op("Cast", [idx], "idx64", {"to": int(onnx.TensorProto.INT64)}, i64)
    g = b.op("Gather", [zt, ind], "gathered", {"axis": 0}, ft)
    val3 = b.op("Unsqueeze", [val, c2], "val3", dtype=ft)
    p = b.op("Mul", [g, val3], "weighted", dtype=ft)
    r = b.op("ReduceSum", [p, c0], "summed", {"keepdims": 0}, ft)
    rt = b.op("Transpose", [r], "summed_T", {"perm": [1, 0]}, ft)
    lead = b.op("Slice", [b.op("Shape", [x], "x_shape", dtype=i64), c0, m1], "lead_shape", dtype=i64)
    out_dim = b.op("Slice", [b.op("Shape", [idx], "idx_shape", dtype=i64), c1, c2], "out_dim", dtype=i64)
    b.op("Reshape", [rt, b.op("Concat", [lead, out_dim], "out_shape", {"axis": 0}, i64)], "out", out=y)


def dense_refold(node: gs.Node, attrs: dict, prefix: str) -> list[gs.Node]:
    """Lowering "dense": W^T = (S D)^T computed from the constants, one MatMul."""
    x, D_t, idx_t, val_t = node.inputs
    D, idx, val = (constant_values(t, "the dense weight") for t in (D_t, idx_t, val_t))
    S = np.zeros((idx.shape[1], D.shape[0]), dtype=val.dtype)
    np.add.at(S, (np.arange(idx.shape[1])[None, :].repeat(idx.shape[0], 0), idx.astype(np.int64)), val)
    b = Body(prefix)
    b.op("MatMul", [x, b.const("W_T", (S @ D).T.astype(D.dtype))], "dense", out=node.outputs[0])
    return b.nodes
