"""SparseDictMatMul (CoSpaDi layers) -> standard ONNX ops for ONNX Runtime.

The exported node is y = SparseDictMatMul(x, D, idx, val) with D (k x in) the dictionary,
idx/val (s x out) each output's s atoms and weights (layers.SparseDictLinear). ONNX Runtime
has no such kernel, so each node becomes one of two standard-op decompositions:

* ``gather``: z = MatMul(x, D^T) (k features), tokens moved last, Gather(z^T, idx, axis=0)
  (s, out, tokens) -> Mul(val) -> ReduceSum(axis=0) -> back to (..., out). Every node after the first MatMul reads the activation, so
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
import onnx
import onnx_graphsurgeon as gs

from ..plugins import DOMAIN
from .annotate import layer_of
from .pipeline import Pass, PassContext, graph_pass

OP_TYPE = "SparseDictMatMul"


@dataclass(frozen=True)
class CostModel:
    """ONNX Runtime on this CPU as three numbers, fitted to single-thread measurements.

    Measured (ORT 1.32, 1 thread, fp32, median of 10): 384->384 layer with k=120, s=57 at
    M = 1/16/128/1024 tokens: dense MatMul 16/43/270/6637 us, gather decomposition
    133/962/10816/72013 us; 384->1536 (k=230, s=107): dense 124/236/1752/15363 us, gather
    1996/12188/66907/562346 us. GEMMs run near 1e11 FLOP/s, while Gather/Mul/ReduceSum on the
    (s, out, M) intermediate cost about 1 ns per element each.
    """

    flops_per_s: float = 1e11
    bytes_per_s: float = 1e10
    elementwise_per_s: float = 1e9
    tokens: int = 128  # reference M: the build's latency points use sequences of 128

    def time(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s)


def layer_costs(in_f: int, out_f: int, k: int, s: int, idx_bytes: int, model: CostModel,
                elem: int = 4) -> dict[str, float]:
    """Modelled seconds of each decomposition for M = model.tokens rows."""
    M = model.tokens
    dense = model.time(2 * M * in_f * out_f, elem * (in_f * out_f + M * (in_f + out_f)))
    # MatMul by D^T, then Gather -> Mul -> ReduceSum each pass over the (s, out, M) intermediate.
    gather = (model.time(2 * M * in_f * k, elem * (in_f * k + M * (in_f + k)) + s * out_f * (idx_bytes + elem))
              + 3 * M * s * out_f / model.elementwise_per_s)
    return {"dense": dense, "gather": gather}


def _const(t: gs.Tensor) -> np.ndarray:
    if not isinstance(t, gs.Constant):
        raise ValueError(f"{OP_TYPE} input {t.name} must be an initializer")
    return np.asarray(t.values)


def decompose(graph: gs.Graph, node: gs.Node, how: str, cache: dict) -> None:
    """Replace `node` in place by the `how` ("gather" | "dense") decomposition."""
    new = decomposition_nodes(node, how, cache)
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.remove(node)
    graph.nodes.extend(new)


def choose(node: gs.Node, model: CostModel | None = None) -> tuple[str, dict[str, float]]:
    """The cheaper decomposition of one node under the cost model, with both modelled costs."""
    D, idx = _const(node.inputs[1]), _const(node.inputs[2])
    k, in_f = D.shape
    s, out_f = idx.shape
    costs = layer_costs(in_f, out_f, k, s, idx.dtype.itemsize, model or CostModel(), D.dtype.itemsize)
    return min(costs, key=costs.get), costs


def decomposition_nodes(node: gs.Node, how: str, cache: dict) -> list[gs.Node]:
    """Standard-op nodes computing node.outputs[0] from node.inputs ("gather" | "dense")."""
    x, D_t, idx_t, val_t = node.inputs
    y = node.outputs[0]
    # fd/<layer>/sparse_dict/SparseDictMatMul_0 -> new nodes fd/<layer>/sparse_dict/<Op>_<role>,
    # so annotate.layer_of() still maps every replacement node to its layer.
    name = node.name or f"{OP_TYPE}_{y.name}"
    base = name.rsplit("/", 1)[0] if layer_of(name) else name
    D, idx, val = _const(D_t), _const(idx_t), _const(val_t)
    if how == "dense":
        S = np.zeros((idx.shape[1], D.shape[0]), dtype=val.dtype)
        np.add.at(S, (np.arange(idx.shape[1])[None, :].repeat(idx.shape[0], 0), idx.astype(np.int64)), val)
        Wt = gs.Constant(f"{base}/W_T", np.ascontiguousarray((S @ D).T.astype(D.dtype)))
        return [gs.Node("MatMul", f"{base}/MatMul_dense", inputs=[x, Wt], outputs=[y])]
    # A shared dictionary (--share group) is transposed once for all its layers.
    key = D_t.name
    if key not in cache:
        cache[key] = gs.Constant(f"{D_t.name}/T", np.ascontiguousarray(D.T))
    Dt = cache[key]
    k, out_f = D.shape[0], idx.shape[1]
    dt = y.dtype

    def v(name: str, dtype=dt) -> gs.Variable:
        return gs.Variable(f"{base}/{name}", dtype=dtype)

    def c(name: str, arr: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{base}/{name}", arr)

    # Tokens as the LAST axis, so Gather copies whole contiguous rows (axis 0): 5x faster in
    # ORT than gathering along the feature axis.
    z, z2, zt, ind, g, p, r, rt, xs, lead, oshape = (
        v("z"), v("z2"), v("zT"), v("idx64", np.int64), v("gathered"), v("weighted"), v("summed"),
        v("summed_T"), v("x_shape", np.int64), v("lead_shape", np.int64), v("out_shape", np.int64))
    val3 = gs.Constant(f"{val_t.name}/3d", np.ascontiguousarray(val[:, :, None]))
    return [
        gs.Node("MatMul", f"{base}/MatMul_dict", inputs=[x, Dt], outputs=[z]),
        gs.Node("Reshape", f"{base}/Reshape_tokens", inputs=[z, c("flat", np.array([-1, k], dtype=np.int64))], outputs=[z2]),
        gs.Node("Transpose", f"{base}/Transpose_tokens_last", attrs={"perm": [1, 0]}, inputs=[z2], outputs=[zt]),
        gs.Node("Cast", f"{base}/Cast_idx", attrs={"to": int(onnx.TensorProto.INT64)}, inputs=[idx_t], outputs=[ind]),
        gs.Node("Gather", f"{base}/Gather_atoms", attrs={"axis": 0}, inputs=[zt, ind], outputs=[g]),
        gs.Node("Mul", f"{base}/Mul_values", inputs=[g, val3], outputs=[p]),
        gs.Node("ReduceSum", f"{base}/ReduceSum_atoms", attrs={"keepdims": 0},
                inputs=[p, c("axes", np.array([0], dtype=np.int64))], outputs=[r]),
        gs.Node("Transpose", f"{base}/Transpose_tokens_first", attrs={"perm": [1, 0]}, inputs=[r], outputs=[rt]),
        gs.Node("Shape", f"{base}/Shape_x", inputs=[x], outputs=[xs]),
        gs.Node("Slice", f"{base}/Slice_lead", inputs=[xs, c("s0", np.array([0], dtype=np.int64)),
                                                       c("s1", np.array([-1], dtype=np.int64))], outputs=[lead]),
        gs.Node("Concat", f"{base}/Concat_shape", attrs={"axis": 0},
                inputs=[lead, c("out", np.array([out_f], dtype=np.int64))], outputs=[oshape]),
        gs.Node("Reshape", f"{base}/Reshape_out", inputs=[rt, oshape], outputs=[y]),
    ]


def sparse_dict_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == OP_TYPE and n.domain == DOMAIN]


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
            best, costs = choose(node, cm)
            how = policy if policy != "cost" else best
            chosen[layer_of(node.name or "") or node.name] = {
                "decomposition": how, "modelled_us": {n: round(c * 1e6, 2) for n, c in costs.items()}}
            decompose(graph, node, how, cache)
        counts = {h: sum(1 for c in chosen.values() if c["decomposition"] == h) for h in ("gather", "dense")}
        ctx.note("sparse-dict-ort", policy=policy, reference_tokens=cm.tokens, layers=len(chosen), **counts,
                 per_layer=chosen)

    return lower


sparse_dict_ort = make_sparse_dict_pass()


@graph_pass("sparse-dict-trt", "keep SparseDictMatMul as a plugin node; indices widened to int32 for the plugin")
def sparse_dict_trt(graph: gs.Graph, ctx: PassContext) -> None:
    """TensorRT keeps the node (plugins/ops/sparse_dict_matmul.py). Its plugin declares int32
    indices (TensorRT's plugin I/O types have no int16, and uint8 is not accepted for plugin
    inputs here), so the idx initializer is widened once in the graph: the engine stores
    4 bytes per index where the ONNX stores 1-2 (reported)."""
    widened, extra = 0, 0
    seen: dict[str, gs.Constant] = {}
    for node in sparse_dict_nodes(graph):
        t = node.inputs[2]
        arr = _const(t)
        if arr.dtype == np.int32:
            continue
        if t.name not in seen:
            seen[t.name] = gs.Constant(f"{t.name}/int32", arr.astype(np.int32))
            extra += arr.size * (4 - arr.dtype.itemsize)
        node.inputs[2] = seen[t.name]
        widened += 1
    ctx.note("sparse-dict-trt", plugin_nodes=len(sparse_dict_nodes(graph)), indices_widened=widened,
             extra_index_bytes=extra)


def local_function() -> onnx.FunctionProto:
    """factordeploy::SparseDictMatMul as an ONNX model-local function (the gather decomposition).

    With it, the graph that keeps the custom node for TensorRT also runs on ONNX Runtime, which
    expands local functions (TENSORRT.md, 'One ONNX for both runtimes'); TensorRT's parser uses the
    registered plugin for nodes carrying plugin_namespace. Shapes come from Shape ops, so one
    function serves every layer. The node attributes (k, s, out_features, plugin_namespace,
    plugin_version) are declared so ONNX Runtime accepts them; the body does not read them.
    """
    from onnx import helper as h

    def const(name: str, vals: list[int]) -> onnx.NodeProto:
        return h.make_node("Constant", [], [name], value=h.make_tensor(name, onnx.TensorProto.INT64, [len(vals)], vals))

    nodes = [
        const("c_m1", [-1]), const("c_0", [0]), const("c_1", [1]), const("c_2", [2]),
        h.make_node("Transpose", ["D"], ["Dt"], perm=[1, 0]),
        h.make_node("MatMul", ["x", "Dt"], ["z"]),
        h.make_node("Shape", ["D"], ["d_shape"]),
        h.make_node("Slice", ["d_shape", "c_0", "c_1"], ["k_dim"]),
        h.make_node("Concat", ["c_m1", "k_dim"], ["flat_shape"], axis=0),
        h.make_node("Reshape", ["z", "flat_shape"], ["z2"]),
        h.make_node("Transpose", ["z2"], ["zt"], perm=[1, 0]),
        h.make_node("Cast", ["idx"], ["idx64"], to=onnx.TensorProto.INT64),
        h.make_node("Gather", ["zt", "idx64"], ["g"], axis=0),
        h.make_node("Unsqueeze", ["val", "c_2"], ["val3"]),
        h.make_node("Mul", ["g", "val3"], ["p"]),
        h.make_node("ReduceSum", ["p", "c_0"], ["r"], keepdims=0),
        h.make_node("Transpose", ["r"], ["rt"], perm=[1, 0]),
        h.make_node("Shape", ["x"], ["x_shape"]),
        h.make_node("Slice", ["x_shape", "c_0", "c_m1"], ["lead"]),
        h.make_node("Shape", ["idx"], ["i_shape"]),
        h.make_node("Slice", ["i_shape", "c_1", "c_2"], ["out_dim"]),
        h.make_node("Concat", ["lead", "out_dim"], ["y_shape"], axis=0),
        h.make_node("Reshape", ["rt", "y_shape"], ["y"]),
    ]
    return h.make_function(DOMAIN, OP_TYPE, ["x", "D", "idx", "val"], ["y"], nodes,
                           [h.make_opsetid("", 18)],
                           attributes=["k", "s", "out_features", "plugin_namespace", "plugin_version"])


def _attach(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    if not any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in model.graph.node):
        return model
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        model.functions.append(local_function())
    ctx.note("sparse-dict-function", attached=True)
    return model


sparse_dict_function = Pass("sparse-dict-function", _attach,
                            "ship SparseDictMatMul's standard-op body as an ONNX local function (ORT runs the TRT graph)")
