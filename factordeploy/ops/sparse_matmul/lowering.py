"""The unstructured-sparse product on ONNX Runtime: its standard-op body, the dense refold, their cost.

* ``gather`` (the op's body): S laid out row-padded (ELL: each output row's nonzeros in k_max
  slots, padding = column 0 with value 0), then per call Gather the input columns of every slot
  (tokens last, so each Gather copies a whole row of tokens), Mul by the values and ReduceSum over
  the slots. No node writes one output element from two places, so the result does not depend
  on ONNX Runtime's thread count. (The first form scattered the (nnz, tokens) products with
  ScatterND(reduction=add): ONNX Runtime's CPU ScatterND splits the updates over its intra-op
  threads without atomics (onnxruntime issue 18048), so rows holding several nonzeros lost
  updates at random with 2+ threads: MiniLM's SLTrain build failed its export check, max abs
  0.0116.) On disk: the int32 flat indices and the values only - the ELL layout is computed from
  them by constant nodes (Div/Mod, Unique for each row's first slot, a duplicate-free
  ScatterND), which ONNX Runtime folds at session creation, in memory (out * k_max * 12 bytes).
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

from ..body import Body, constant_values
from ..cost import CostModel

INDEX_BYTES = 4  # int32 flat indices


def max_row_nnz(idx: np.ndarray, in_f: int) -> int:
    """k_max: the most nonzeros any output row holds (the ELL width; at least 1)."""
    rows = np.asarray(idx).astype(np.int64) // in_f
    return max(int(np.bincount(rows).max()) if rows.size else 0, 1)


def layer_costs(in_f: int, out_f: int, nnz: int, elem: int = 4, model: CostModel | None = None,
                k_max: int | None = None) -> dict[str, dict]:
    """Modelled seconds (at the model's reference token count) and stored bytes of each lowering.

    `k_max` (default: the mean row count, rounded up) is the ELL width: the gather form touches
    out * k_max slots per token. Gather + Mul + ReduceSum cost about one element-wise element per
    (slot, token) together (~0.6 ns), not one each.
    """
    cm = model or CostModel()
    M = cm.tokens
    k = k_max if k_max is not None else max(-(-nnz // max(out_f, 1)), 1)
    dense_t = cm.time(2 * M * in_f * out_f, elem * (in_f * out_f + M * (in_f + out_f)))
    # Gather -> Mul -> ReduceSum over (out * k_max, M) as one pass; Transposes of (in, M), (out, M)
    gather_t = (cm.time(0, elem * M * (in_f + out_f) + out_f * k * (8 + elem))
                + (M * out_f * k + M * out_f + M * in_f) / cm.elementwise_per_s)
    return {"gather": {"seconds": gather_t, "bytes": nnz * (INDEX_BYTES + elem)},
            "dense": {"seconds": dense_t, "bytes": in_f * out_f * elem}}


def costs(consts: list, attrs: dict, model: CostModel | None = None) -> dict[str, float]:
    """OpSpec.cost: modelled seconds of the lowerings that keep model.onnx at most the sparse form's size."""
    _x, idx, val = consts
    if val is None or idx is None:
        raise ValueError("the sparse product needs constant indices and values to be costed")
    in_f = int(attrs["in_features"])
    c = layer_costs(in_f, int(attrs["out_features"]), val.size, val.dtype.itemsize, model, max_row_nnz(idx, in_f))
    return {k: v["seconds"] for k, v in c.items() if v["bytes"] <= c["gather"]["bytes"]}


def body(b: Body, inputs: list, outputs: list, attrs: dict) -> None:
    """The row-padded gather form (reads in_features / out_features: no model-local function)."""
    x, idx, val = inputs
    y = outputs[0]
    ft, i64 = y.dtype, np.int64
    in_f, out_f = int(attrs["in_features"]), int(attrs["out_features"])
    c0, c1, m1 = (b.const(n, np.array([v], dtype=i64)) for n, v in (("c0", 0), ("c1", 1), ("m1", -1)))
    zero_t = onnx.numpy_helper.from_array(np.zeros(1, dtype=np.float32 if ft is None else np.dtype(ft)))
    # S's ELL layout from the constant inputs (ORT folds all of it at session creation)
    ind = b.op("Cast", [idx], "idx64", {"to": int(onnx.TensorProto.INT64)}, i64)
    n_in = b.const("in", np.array(in_f, dtype=i64))
    rows = b.op("Div", [ind, n_in], "rows", dtype=i64)
    cols = b.op("Mod", [ind, n_in], "cols", dtype=i64)
    _u, first, inverse, counts = b.ops("Unique", [rows], ["row_ids", "row_first", "row_of", "row_counts"],
                                      {"sorted": 1}, [i64] * 4)
    k_max = b.op("ReduceMax", [b.op("Concat", [counts, c1], "counts1", {"axis": 0}, i64), c0], "k_max",
                 {"keepdims": 1}, i64)
    nnz = b.op("Squeeze", [b.op("Shape", [ind], "nnz1", dtype=i64), c0], "nnz", dtype=i64)
    scalar = [b.op("Squeeze", [c], f"{c.name.rsplit('/', 1)[-1]}_scalar", dtype=i64) for c in (c0, c1)]  # Range: 0-d
    arange = b.op("Range", [scalar[0], nnz, scalar[1]], "arange", dtype=i64)
    slot_in_row = b.op("Sub", [arange, b.op("Gather", [first, inverse], "row_start", {"axis": 0}, i64)],
                       "slot_in_row", dtype=i64)
    slot = b.op("Unsqueeze", [b.op("Add", [b.op("Mul", [rows, k_max], "row_base", dtype=i64), slot_in_row],
                                   "slot_flat", dtype=i64), c1], "slot", dtype=i64)
    out_c = b.const("out", np.array([out_f], dtype=i64))
    ell_n = b.op("Mul", [out_c, k_max], "ell_n", dtype=i64)
    ell_shape = b.op("Concat", [out_c, k_max], "ell_shape", {"axis": 0}, i64)

    def ell(values: gs.Tensor, fill: onnx.TensorProto, role: str, dtype) -> gs.Variable:
        empty = b.op("ConstantOfShape", [ell_n], f"{role}_empty", {"value": fill}, dtype)
        flat = b.op("ScatterND", [empty, slot, values], f"{role}_flat", dtype=dtype)  # unique slots: no reduction
        return b.op("Reshape", [flat, ell_shape], role, dtype=dtype)

    cols_ell = ell(cols, onnx.numpy_helper.from_array(np.zeros(1, dtype=i64)), "cols_ell", i64)
    val_ell = b.op("Unsqueeze", [ell(val, zero_t, "val_ell", ft), b.const("c2", np.array([2], dtype=i64))],
                   "val_ell3", dtype=ft)
    # per call: tokens last, gather every slot's input column, weight, sum the slots of each row
    x2 = b.op("Reshape", [x, b.const("flat", np.array([-1, in_f], dtype=i64))], "x2", dtype=ft)
    xt = b.op("Transpose", [x2], "xT", {"perm": [1, 0]}, ft)
    g = b.op("Gather", [xt, cols_ell], "gathered", {"axis": 0}, ft)  # (out, k_max, tokens)
    p = b.op("Mul", [g, val_ell], "weighted", dtype=ft)
    yt = b.op("ReduceSum", [p, c1], "row_sums", {"keepdims": 0}, ft)  # (out, tokens)
    y2 = b.op("Transpose", [yt], "tokens_first", {"perm": [1, 0]}, ft)
    lead = b.op("Slice", [b.op("Shape", [x], "x_shape", dtype=i64), c0, m1], "lead_shape", dtype=i64)
    b.op("Reshape", [y2, b.op("Concat", [lead, out_c], "out_shape", {"axis": 0}, i64)], "out", out=y)


def dense_refold(node: gs.Node, attrs: dict, prefix: str) -> list[gs.Node]:
    """Lowering "dense": S^T (in x out) scattered from the constants, one MatMul."""
    _x, idx_t, val_t = node.inputs
    idx, val = constant_values(idx_t, "the dense matrix"), constant_values(val_t, "the dense matrix")
    in_f, out_f = int(attrs["in_features"]), int(attrs["out_features"])
    S = np.zeros(out_f * in_f, dtype=val.dtype)
    S[idx.astype(np.int64)] = val
    b = Body(prefix)
    b.op("MatMul", [node.inputs[0], b.const("S_T", S.reshape(out_f, in_f).T)], "dense", out=node.outputs[0])
    return b.nodes
