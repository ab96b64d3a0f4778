"""SparseMatMul: SLTrain's unstructured sparse part S (compress/layers.SparsePlusLowRankLinear) as a plugin op.

y[..., o] = sum over nonzeros (o, i) of S: val * x[..., i]
x [..., in] (activation), idx [nnz] int32 sorted flat row-major indices o * in + i, val [nnz];
attributes in_features, out_features. Output: x's shape with the last dim replaced by out.

ONNX Runtime lowering (`decompose`), one of two standard-op forms chosen per node by `choose`:
* ``gather``: Gather the nnz input columns (tokens last), Mul by the values, ScatterND(add) into
  the (out, tokens) output. On disk only the int32 indices and the values (the row/column split
  Div/Mod of the constant indices is folded by ORT at session creation, in memory);
* ``dense``: S refolded into a dense (in x out) constant and one MatMul - fastest on a CPU GEMM
  for large token counts, but it stores out * in values beside the low-rank factors, more than
  the uncompressed layer. It is eligible only where it does not grow the stored bytes (density
  >= elem / (elem + 4)); `choose` returns the fastest eligible form by the modelled cost and both
  costs, so the report can say what the dense form would have cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import register_op
from ..spec import Attr, Launch, OpSpec

OP_TYPE = "SparseMatMul"


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    x = dims[0]
    return [list(x[:-1]) + [alg.const(attrs["out_features"])]]


def reference(x, idx, val, in_features: int = 0, out_features: int = 0, **_attrs):
    """Torch ground truth: S scattered dense (out x in), one product."""
    import torch

    S = torch.zeros(out_features * in_features, dtype=torch.float32, device=x.device)
    S.scatter_(0, idx.long(), val.float())
    return ((x.float() @ S.view(out_features, in_features).T).to(x.dtype),)


def layer_costs(in_f: int, out_f: int, nnz: int, elem: int = 4, tokens: int | None = None) -> dict[str, dict]:
    """Modelled seconds and stored bytes of each form for the reference token count (roofline of
    passes/sparse_dict.CostModel: GEMM FLOP/s, bandwidth, ~1 ns per element-wise element)."""
    from ...passes.sparse_dict import CostModel

    cm = CostModel()
    M = tokens or cm.tokens
    dense_t = cm.time(2 * M * in_f * out_f, elem * (in_f * out_f + M * (in_f + out_f)))
    # Transpose x, Gather, Mul, ScatterND over (nnz, M), zero-fill + Transpose of (out, M)
    gather_t = (cm.time(0, elem * M * (in_f + out_f) + nnz * (4 + elem))
                + (3 * M * nnz + 2 * M * out_f + M * in_f) / cm.elementwise_per_s)
    return {"dense": {"seconds": dense_t, "bytes": in_f * out_f * elem},
            "gather": {"seconds": gather_t, "bytes": nnz * (4 + elem)}}


def choose(in_f: int, out_f: int, nnz: int, elem: int = 4) -> tuple[str, dict[str, dict]]:
    costs = layer_costs(in_f, out_f, nnz, elem)
    eligible = {k: c for k, c in costs.items() if c["bytes"] <= costs["gather"]["bytes"]}
    return min(eligible, key=lambda k: eligible[k]["seconds"]), costs


def _const(t: Any) -> np.ndarray:
    import onnx_graphsurgeon as gs

    if not isinstance(t, gs.Constant):
        raise ValueError(f"{OP_TYPE} input {t.name} must be an initializer")
    return np.asarray(t.values)


def decomposition_nodes(node: Any, how: str, attrs: dict) -> list[Any]:
    """Standard-op nodes computing node.outputs[0] from node.inputs ("gather" | "dense")."""
    import onnx
    import onnx_graphsurgeon as gs

    x, idx_t, val_t = node.inputs
    y = node.outputs[0]
    in_f, out_f = int(attrs["in_features"]), int(attrs["out_features"])
    name = node.name or f"{OP_TYPE}_{y.name}"
    base = name.rsplit("/", 1)[0] if name.startswith("fd/") else name  # keep the fd/<layer>/<kind>/ prefix
    idx, val = _const(idx_t), _const(val_t)
    if how == "dense":
        S = np.zeros(out_f * in_f, dtype=val.dtype)
        S[idx.astype(np.int64)] = val
        Wt = gs.Constant(f"{base}/S_T", np.ascontiguousarray(S.reshape(out_f, in_f).T))
        return [gs.Node("MatMul", f"{base}/MatMul_sparse_dense", inputs=[x, Wt], outputs=[y])]

    def v(n: str, dtype=None) -> gs.Variable:
        return gs.Variable(f"{base}/{n}", dtype=dtype)

    def c(n: str, arr: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{base}/{n}", arr)

    i64 = np.int64
    x2, xt, ind, rows, cols, rows2, g, p, xs2, m, zshape, z, yt, y2, xs, lead, oshape = (
        v("x2"), v("xT"), v("idx64", i64), v("rows", i64), v("cols", i64), v("rows2", i64), v("gathered"),
        v("weighted"), v("x2_shape", i64), v("tokens", i64), v("zero_shape", i64), v("zeros"), v("yT"), v("y2"),
        v("x_shape", i64), v("lead_shape", i64), v("out_shape", i64))
    val2 = gs.Constant(f"{val_t.name}/2d", np.ascontiguousarray(val.reshape(-1, 1)))
    n_in = c("in", np.array(in_f, dtype=i64))
    return [
        gs.Node("Reshape", f"{base}/Reshape_tokens", inputs=[x, c("flat", np.array([-1, in_f], dtype=i64))], outputs=[x2]),
        gs.Node("Transpose", f"{base}/Transpose_tokens_last", attrs={"perm": [1, 0]}, inputs=[x2], outputs=[xt]),
        gs.Node("Cast", f"{base}/Cast_idx", attrs={"to": int(onnx.TensorProto.INT64)}, inputs=[idx_t], outputs=[ind]),
        gs.Node("Div", f"{base}/Div_rows", inputs=[ind, n_in], outputs=[rows]),
        gs.Node("Mod", f"{base}/Mod_cols", inputs=[ind, n_in], outputs=[cols]),
        gs.Node("Unsqueeze", f"{base}/Unsqueeze_rows", inputs=[rows, c("ax1", np.array([1], dtype=i64))], outputs=[rows2]),
        gs.Node("Gather", f"{base}/Gather_columns", attrs={"axis": 0}, inputs=[xt, cols], outputs=[g]),
        gs.Node("Mul", f"{base}/Mul_values", inputs=[g, val2], outputs=[p]),
        gs.Node("Shape", f"{base}/Shape_x2", inputs=[x2], outputs=[xs2]),
        gs.Node("Slice", f"{base}/Slice_tokens", inputs=[xs2, c("t0", np.array([0], dtype=i64)),
                                                         c("t1", np.array([1], dtype=i64))], outputs=[m]),
        gs.Node("Concat", f"{base}/Concat_zero_shape", attrs={"axis": 0},
                inputs=[c("out_dim", np.array([out_f], dtype=i64)), m], outputs=[zshape]),
        gs.Node("ConstantOfShape", f"{base}/ConstantOfShape_zeros",
                attrs={"value": onnx.numpy_helper.from_array(np.zeros(1, dtype=val.dtype))},
                inputs=[zshape], outputs=[z]),
        gs.Node("ScatterND", f"{base}/ScatterND_rows", attrs={"reduction": "add"}, inputs=[z, rows2, p], outputs=[yt]),
        gs.Node("Transpose", f"{base}/Transpose_tokens_first", attrs={"perm": [1, 0]}, inputs=[yt], outputs=[y2]),
        gs.Node("Shape", f"{base}/Shape_x", inputs=[x], outputs=[xs]),
        gs.Node("Slice", f"{base}/Slice_lead", inputs=[xs, c("s0", np.array([0], dtype=i64)),
                                                       c("s1", np.array([-1], dtype=i64))], outputs=[lead]),
        gs.Node("Concat", f"{base}/Concat_shape", attrs={"axis": 0},
                inputs=[lead, c("out", np.array([out_f], dtype=i64))], outputs=[oshape]),
        gs.Node("Reshape", f"{base}/Reshape_out", inputs=[y2, oshape], outputs=[y]),
    ]


def decompose(graph: Any, node: Any, attrs: dict) -> list[Any]:
    """Standard ops for ONNX Runtime: the form `choose` picks for this node's shape and density."""
    val = _const(node.inputs[2])
    how, _ = choose(int(attrs["in_features"]), int(attrs["out_features"]), val.size, val.dtype.itemsize)
    return decomposition_nodes(node, how, attrs)


@dataclass
class SparseMatMulLaunch(Launch):
    """The atomic gather-scatter kernel on the current stream (an fp32 accumulator when y is not fp32)."""

    inputs: tuple = ()
    output: Any = None
    out_features: int = 0

    def __call__(self) -> Any:
        from ..kernels.sparse_matmul import sparse_matmul

        x, idx, val = self.inputs
        return sparse_matmul(x, idx, val, self.out_features, out=self.output)


def launch(inputs: list, outputs: list, attrs: dict) -> Launch:
    from ..kernels import sparse_matmul as k

    return SparseMatMulLaunch(k.sparse_matmul_kernel, (), (), num_warps=k.NUM_WARPS, num_stages=k.NUM_STAGES,
                              inputs=tuple(inputs), output=outputs[0], out_features=int(attrs["out_features"]))


def example(scale: int, dtype, device: str) -> tuple[list, dict]:
    """A MiniLM FFN up-projection's S at SLTrain's delta 0.03: in 384, out 1536; x [8, 16*scale, 384]."""
    import torch

    g = torch.Generator().manual_seed(scale)
    n_in, n_out = 384, 1536
    nnz = round(0.03 * n_in * n_out)
    x = torch.randn(8, 16 * scale, n_in, generator=g).to(dtype=dtype, device=device)
    idx = torch.randperm(n_in * n_out, generator=g)[:nnz].sort().values.to(torch.int32).to(device)
    val = torch.randn(nnz, generator=g).to(dtype=dtype, device=device)
    return [x, idx, val], {"in_features": n_in, "out_features": n_out}


SPEC = register_op(OpSpec(
    name=OP_TYPE,
    inputs=("x", "idx", "val"), outputs=("y",),
    input_types=("T", "int32", "T"), output_types=("T",),
    attrs=(Attr("in_features", "int", 0, "columns of S (= x.shape[-1])"),
           Attr("out_features", "int", 0, "rows of S (the output width)")),
    output_shapes=_shapes,
    reference=reference,
    decompose=decompose,
    launch=launch,
    example=lambda scale, dtype, device: example(scale, dtype, device),
    doc=__doc__ or "",
))
