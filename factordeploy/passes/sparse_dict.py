"""SparseDictMatMul (CoSpaDi layers) -> standard ONNX ops for ONNX Runtime.

The exported node is y = SparseDictMatMul(x, D, idx, val) with D (k x in) the dictionary,
idx/val (s x out) each output's s atoms and weights (layers.SparseDictLinear). ONNX Runtime
has no such kernel, so each node becomes one of two standard-op decompositions:

* ``gather``: z = MatMul(x, D^T) (k features) -> Gather(z, idx, axis=-1) (..., s, out) ->
  Mul(val) -> ReduceSum(axis=-2). Every node after the first MatMul reads the activation, so
  no constant folding (ours or ORT's) can rebuild the dense W; the only all-constant node is
  Cast(idx -> int64) (ONNX Gather takes int32/int64 indices), which ORT folds at session
  creation: on disk the indices keep their 1-2 byte width, in ORT's memory they are int64.
* ``dense``: one constant W^T = (S D)^T (in x out) and MatMul(x, W^T): the refold. Fastest
  for large token counts on a CPU GEMM, but stores the full dense matrix again.

The choice is per layer by a modelled cost for the target at a reference token count M
(roofline: max(FLOPs / peak, bytes moved / bandwidth) summed over the nodes), so it can differ
between square attention projections and wide FFN layers; every decision is written to the
pass log (PassContext.note) with both costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .annotate import layer_of
from .pipeline import PassContext, graph_pass

OP_TYPE = "SparseDictMatMul"
DOMAIN = "factordeploy"


@dataclass(frozen=True)
class CostModel:
    """A machine as two numbers; the defaults are a modest CPU core pair (fp32)."""

    flops_per_s: float = 5e10
    bytes_per_s: float = 1e10
    tokens: int = 128  # reference M: the build's latency points use sequences of 128

    def time(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s)


def layer_costs(in_f: int, out_f: int, k: int, s: int, idx_bytes: int, model: CostModel,
                elem: int = 4) -> dict[str, float]:
    """Modelled seconds of each decomposition for M = model.tokens rows."""
    M = model.tokens
    dense = model.time(2 * M * in_f * out_f, elem * (in_f * out_f + M * (in_f + out_f)))
    # MatMul by D^T, then Gather -> Mul -> ReduceSum each stream the (M, s, out) intermediate.
    gather = (model.time(2 * M * in_f * k, elem * (in_f * k + M * (in_f + k)))
              + model.time(0, s * out_f * idx_bytes + elem * M * s * out_f + M * k * elem)
              + model.time(M * s * out_f, elem * (2 * M * s * out_f + s * out_f))
              + model.time(M * s * out_f, elem * (M * s * out_f + M * out_f)))
    return {"dense": dense, "gather": gather}


def _const(t: gs.Tensor) -> np.ndarray:
    if not isinstance(t, gs.Constant):
        raise ValueError(f"{OP_TYPE} input {t.name} must be an initializer")
    return np.asarray(t.values)


def decompose(graph: gs.Graph, node: gs.Node, how: str, cache: dict) -> None:
    """Replace `node` in place by the `how` ("gather" | "dense") decomposition."""
    x, D_t, idx_t, val_t = node.inputs
    y = node.outputs[0]
    # fd/<layer>/sparse_dict/SparseDictMatMul_0 -> new nodes fd/<layer>/sparse_dict/<Op>_<role>,
    # so annotate.layer_of() still maps every replacement node to its layer.
    name = node.name or f"{OP_TYPE}_{y.name}"
    base = name.rsplit("/", 1)[0] if layer_of(name) else name
    D, idx, val = _const(D_t), _const(idx_t), _const(val_t)
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.remove(node)
    if how == "dense":
        S = np.zeros((idx.shape[1], D.shape[0]), dtype=val.dtype)
        np.add.at(S, (np.arange(idx.shape[1])[None, :].repeat(idx.shape[0], 0), idx.astype(np.int64)), val)
        Wt = gs.Constant(f"{base}/W_T", np.ascontiguousarray((S @ D).T.astype(D.dtype)))
        graph.nodes.append(gs.Node("MatMul", f"{base}/MatMul_dense", inputs=[x, Wt], outputs=[y]))
        return
    # A shared dictionary (--share group) is transposed once for all its layers.
    key = D_t.name
    if key not in cache:
        cache[key] = gs.Constant(f"{D_t.name}/T", np.ascontiguousarray(D.T))
    Dt = cache[key]
    z = gs.Variable(f"{base}/z", dtype=y.dtype)
    ind = gs.Variable(f"{base}/idx64", dtype=np.int64, shape=list(idx.shape))
    g = gs.Variable(f"{base}/gathered", dtype=y.dtype)
    p = gs.Variable(f"{base}/weighted", dtype=y.dtype)
    axes = gs.Constant(f"{base}/axes", np.array([-2], dtype=np.int64))
    graph.nodes.extend([
        gs.Node("MatMul", f"{base}/MatMul_dict", inputs=[x, Dt], outputs=[z]),
        gs.Node("Cast", f"{base}/Cast_idx", attrs={"to": int(onnx_int64())}, inputs=[idx_t], outputs=[ind]),
        gs.Node("Gather", f"{base}/Gather_atoms", attrs={"axis": -1}, inputs=[z, ind], outputs=[g]),
        gs.Node("Mul", f"{base}/Mul_values", inputs=[g, val_t], outputs=[p]),
        gs.Node("ReduceSum", f"{base}/ReduceSum_atoms", attrs={"keepdims": 0}, inputs=[p, axes], outputs=[y]),
    ])


def onnx_int64() -> int:
    import onnx

    return onnx.TensorProto.INT64


def sparse_dict_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == OP_TYPE and (n.domain in (DOMAIN, "", None))]


def make_sparse_dict_pass(policy: str = "cost", model: CostModel | None = None):
    """The ORT lowering pass; policy "cost" (per layer, modelled), or "gather"/"dense" for all."""
    if policy not in ("cost", "gather", "dense"):
        raise ValueError(f"unknown policy {policy}")
    cm = model or CostModel()

    @graph_pass("sparse-dict-ort", "lower SparseDictMatMul to Gather/Mul/ReduceSum or a dense MatMul per layer")
    def lower(graph: gs.Graph, ctx: PassContext) -> None:
        chosen: dict[str, dict] = {}
        cache: dict = {}
        for node in sparse_dict_nodes(graph):
            D, idx = _const(node.inputs[1]), _const(node.inputs[2])
            k, in_f = D.shape
            s, out_f = idx.shape
            costs = layer_costs(in_f, out_f, k, s, idx.dtype.itemsize, cm, D.dtype.itemsize)
            how = policy if policy != "cost" else min(costs, key=costs.get)
            chosen[layer_of(node.name or "") or node.name] = {
                "decomposition": how, "modelled_us": {n: round(c * 1e6, 2) for n, c in costs.items()}}
            decompose(graph, node, how, cache)
        counts = {h: sum(1 for c in chosen.values() if c["decomposition"] == h) for h in ("gather", "dense")}
        ctx.note("sparse-dict-ort", policy=policy, reference_tokens=cm.tokens, layers=len(chosen), **counts,
                 per_layer=chosen)

    return lower


sparse_dict_ort = make_sparse_dict_pass()
