"""`verify-2to4`: check that every 2:4 layer still carries its pattern in the graph TensorRT sees.

TensorRT's sparse weights want 2:4 along K, the reduction dimension: axis 0 of an ONNX MatMul's
constant B [K, N], axis 1 of a Gemm's B when transB=1 (TENSORRT.md). The dynamo exporter turns
`F.linear(x, W)` into MatMul(x, W^T) with the transposed weight stored as an initializer
[in, out], so W's 2:4 along `in` already lies on axis 0: no relayout pass is needed (checked by
tests/test_sparse24.py on a real export). A Transpose of a constant that was not folded is followed.

Each layer declares its 2:4 factor in the manifest (`"weight_2to4": [K, N]`, the shape of the MatMul's
constant B; compress/layers.py graph_facts(): W^T [in, out] for a 2:4 linear, S^T [in, k] for a
dense x sparse one). For each such layer the pass finds, among the nodes the annotate pass named
`fd/<layer>/...`, a MatMul/Gemm whose constant weight has that shape and checks at most 2 nonzeros
in every group of 4 along K.
Any layer that fails raises UserError naming it (the build must not ship an artifact that claims
2:4 when the pattern was lost); the per-layer results go to the pass log either way.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..compress.layers import violations_24
from ..errors import UserError
from .annotate import factorized_nodes, read_manifest
from .pipeline import Pass, PassContext

FACT = "weight_2to4"  # manifest key: [K, N] of the layer's 2:4 constant (compress/layers.py graph_facts)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _weight(name: str, consts: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The constant behind `name`, following a 2-D Transpose of a constant."""
    if name in consts:
        return numpy_helper.to_array(consts[name])
    p = producers.get(name)
    if p is not None and p.op_type == "Transpose" and p.input[0] in consts:
        arr = numpy_helper.to_array(consts[p.input[0]])
        perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
        return np.transpose(arr, perm) if perm else arr.T
    return None


class GraphIndex:
    """Constants and producers of a graph, built once for all layers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.by_layer = factorized_nodes(model)
        self.consts = _constants(model.graph)
        self.producers = {o: n for n in model.graph.node for o in n.output}


def layer_weights(index: GraphIndex, layer: str) -> list[tuple[str, np.ndarray, int]]:
    """(node name, constant weight, K axis) for every MatMul/Gemm named as part of `layer`."""
    consts, producers = index.consts, index.producers
    out = []
    for n in index.by_layer.get(layer, []):
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        w = _weight(n.input[1], consts, producers)
        if w is None or w.ndim != 2:
            continue
        axis = 0
        if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            axis = 1
        out.append((n.name, w, axis))
    return out


def check_layer(index: GraphIndex, layer: str, desc: dict) -> str | None:
    """None when the layer's declared 2:4 weight is 2:4 along K in the graph, else the problem."""
    K, N = desc[FACT]
    found = layer_weights(index, layer)
    if not found:
        return "no MatMul/Gemm with a constant weight named fd/<layer>/ (renamed, fused or folded away?)"
    for node, w, axis in found:
        kn = w.shape if axis == 0 else w.shape[::-1]
        if tuple(kn) != (K, N):
            continue
        v = violations_24(torch.from_numpy((np.asarray(w) != 0).astype(np.float32)), dim=axis)  # any dtype (bf16 too)
        if v == 0:
            return None
        return f"{node}: {v} groups of 4 along K have more than 2 nonzeros" if v > 0 else f"{node}: K={K} not divisible by 4"
    return f"no constant weight of shape [K={K}, N={N}] among {[tuple(w.shape) for _, w, _ in found]}"


def verify(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    layers = ctx.layers or read_manifest(model)
    sparse = {n: d for n, d in layers.items() if d.get(FACT)}
    index = GraphIndex(model)
    problems = {n: p for n, d in sparse.items() if (p := check_layer(index, n, d)) is not None}
    ctx.note("verify-2to4", layers_checked=len(sparse), layers_2to4=len(sparse) - len(problems),
             k_axis="MatMul B axis 0 / Gemm transB=1 axis 1")
    if problems:
        ctx.note("verify-2to4", failed=problems)
        first = "; ".join(f"{n}: {p}" for n, p in list(problems.items())[:5])
        raise UserError(f"2:4 pattern lost after export/passes in {len(problems)} layer(s): {first}",
                        "report this as a bug; a pass folded or rewrote a 2:4 weight")
    return model


verify_2to4 = Pass("verify-2to4", verify, "check every layer's declared 2:4 weight is 2:4 along K after export and folding")
