"""The unstructured-sparse product on ONNX Runtime: its standard-op body, the dense refold, their cost.

* ``gather`` (the op's body): tokens moved last, Gather the input columns of the nnz entries,
  Mul by the values, ScatterND(reduction=add) into the (out, tokens) output, back to (..., out).
  On disk: the int32 flat indices and the values only - the row/column split (Cast, Div, Mod of
  the constant indices) is folded by ONNX Runtime at session creation, in memory.
* ``dense``: S refolded into a dense (in x out) constant and one MatMul: fastest on a CPU GEMM,
  but it stores out * in values beside the layer's low-rank factors, MORE than the uncompressed
  layer. The cost model therefore offers it only where it does not grow the stored bytes
  (density >= elem / (elem + 4)); elsewhere the "cost" policy can only pick ``gather`` (a fixed
  policy "dense" still forces it), and `layer_costs` reports both forms' time and bytes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..body import Body
from ..cost import CostModel

INDEX_BYTES = 4  # int32 flat indices


def layer_costs(in_f: int, out_f: int, nnz: int, elem: int = 4, model: CostModel | None = None) -> dict[str, dict]:
    """Modelled seconds (at the model's reference token count) and stored bytes of each lowering.

    Measured (ORT, 1 thread, fp32, median of 15; S alone, delta 0.03): 384 -> 1536 at M = 1/16/128
    tokens: gather 0.127/0.311/1.425 ms, dense 0.039/0.126/0.909 ms; 384 -> 384: gather
    0.038/0.090/0.278 ms, dense 0.013/0.032/0.194 ms. Gather + Mul + ScatterND cost about one
    element-wise element per (nonzero, token) together (~0.6 ns), not one each.
    """
    cm = model or CostModel()
    M = cm.tokens
    dense_t = cm.time(2 * M * in_f * out_f, elem * (in_f * out_f + M * (in_f + out_f)))
    # Gather -> Mul -> ScatterND over (nnz, M) as one pass; zero fill + Transposes of (out, M), (in, M)
    gather_t = (cm.time(0, elem * M * (in_f + out_f) + nnz * (INDEX_BYTES + elem))
                + (M * nnz + 2 * M * out_f + M * in_f) / cm.elementwise_per_s)
    return {"gather": {"seconds": gather_t, "bytes": nnz * (INDEX_BYTES + elem)},
            "dense": {"seconds": dense_t, "bytes": in_f * out_f * elem}}


def costs(consts: list, attrs: dict, model: CostModel | None = None) -> dict[str, float]:
    """OpSpec.cost: modelled seconds of the lowerings that keep model.onnx at most the sparse form's size."""
    _x, _idx, val = consts
    if val is None:
        raise ValueError("the sparse product needs constant values to be costed")
    c = layer_costs(int(attrs["in_features"]), int(attrs["out_features"]), val.size, val.dtype.itemsize, model)
    return {k: v["seconds"] for k, v in c.items() if v["bytes"] <= c["gather"]["bytes"]}


def body(b: Body, inputs: list, outputs: list, attrs: dict) -> None:
    """The gather/scatter form (reads in_features / out_features: no model-local function)."""
    x, idx, val = inputs
    y = outputs[0]
    ft, i64 = y.dtype, np.int64
    in_f, out_f = int(attrs["in_features"]), int(attrs["out_features"])
    c0, c1, m1 = (b.const(n, np.array([v], dtype=i64)) for n, v in (("c0", 0), ("c1", 1), ("m1", -1)))
    x2 = b.op("Reshape", [x, b.const("flat", np.array([-1, in_f], dtype=i64))], "x2", dtype=ft)
    xt = b.op("Transpose", [x2], "xT", {"perm": [1, 0]}, ft)  # tokens last: Gather copies whole rows
    ind = b.op("Cast", [idx], "idx64", {"to": int(onnx.TensorProto.INT64)}, i64)
    n_in = b.const("in", np.array(in_f, dtype=i64))
    rows = b.op("Unsqueeze", [b.op("Div", [ind, n_in], "rows", dtype=i64), c1], "rows2", dtype=i64)
    cols = b.op("Mod", [ind, n_in], "cols", dtype=i64)
    g = b.op("Gather", [xt, cols], "gathered", {"axis": 0}, ft)
    p = b.op("Mul", [g, b.op("Unsqueeze", [val, c1], "val2", dtype=ft)], "weighted", dtype=ft)
    tokens = b.op("Slice", [b.op("Shape", [x2], "x2_shape", dtype=i64), c0, c1], "tokens", dtype=i64)
    zshape = b.op("Concat", [b.const("out_dim", np.array([out_f], dtype=i64)), tokens], "zero_shape", {"axis": 0}, i64)
    zeros = b.op("ConstantOfShape", [zshape], "zeros", {"value": onnx.numpy_helper.from_array(
        np.zeros(1, dtype=np.float32 if ft is None else np.dtype(ft)))}, ft)
    yt = b.op("ScatterND", [zeros, rows, p], "scattered", {"reduction": "add"}, ft)
    y2 = b.op("Transpose", [yt], "tokens_first", {"perm": [1, 0]}, ft)
    lead = b.op("Slice", [b.op("Shape", [x], "x_shape", dtype=i64), c0, m1], "lead_shape", dtype=i64)
    b.op("Reshape", [y2, b.op("Concat", [lead, b.const("out", np.array([out_f], dtype=i64))], "out_shape",
                              {"axis": 0}, i64)], "out", out=y)


def _const(t: gs.Tensor) -> np.ndarray:
    if not isinstance(t, gs.Constant):
        raise ValueError(f"input {t.name} must be an initializer to refold the dense matrix")
    return np.asarray(t.values)


def dense_refold(node: gs.Node, attrs: dict, prefix: str) -> list[gs.Node]:
    """Lowering "dense": S^T (in x out) scattered from the constants, one MatMul."""
    _x, idx_t, val_t = node.inputs
    idx, val = _const(idx_t), _const(val_t)
    in_f, out_f = int(attrs["in_features"]), int(attrs["out_features"])
    S = np.zeros(out_f * in_f, dtype=val.dtype)
    S[idx.astype(np.int64)] = val
    b = Body(prefix)
    b.op("MatMul", [node.inputs[0], b.const("S_T", S.reshape(out_f, in_f).T)], "dense", out=node.outputs[0])
    return b.nodes
