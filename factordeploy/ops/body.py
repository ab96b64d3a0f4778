"""Where an op's standard-op body writes its nodes, and the two things made from one body.

An op writes its body once (`OpSpec.body(b, inputs, outputs, attrs)`) against `Body`:
`b.op("MatMul", [x, w], "mm")` appends a gs.Node and returns its output Variable, `out=` binds the
final node to a given output, `b.const("axes", array)` makes a constant. From that one body:
- `inline(spec, node, prefix)`: nodes replacing a custom node in a graph (the ONNX Runtime lowering),
  reading the node's own input tensors;
- `Body.adopt(graph, ...)`: a body may also be a traced graph (e.g. the op's torch reference exported
  once by the dynamo exporter) whose nodes are appended under the prefix;
- `as_function(spec)`: a gs.Function (ONNX model-local function, domain and name of the op), which
  ONNX Runtime expands where the TensorRT graph keeps the custom node for the plugin.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .spec import OpSpec

# Attributes the TensorRT parser reads on plugin nodes; a local function must declare them too.
PLUGIN_ATTRS = ("plugin_namespace", "plugin_version")


class Body:
    """A node list under a name prefix (a layer's `fd/<layer>/<kind>` when inlined, none in a function)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[gs.Node] = []

    def _name(self, role: str) -> str:
        return f"{self.prefix}/{role}" if self.prefix else role

    def const(self, role: str, values: Any) -> gs.Constant:
        return gs.Constant(self._name(role), np.ascontiguousarray(values))

    def op(self, op_type: str, inputs: Sequence[gs.Tensor], role: str, attrs: dict | None = None,
           dtype: Any = None, out: gs.Variable | None = None) -> gs.Variable:
        """Append `op_type` (named `<prefix>/<op_type>_<role>`); returns its output (`out` when given)."""
        y = out if out is not None else gs.Variable(self._name(role), dtype=dtype)
        self.nodes.append(gs.Node(op_type, self._name(f"{op_type}_{role}"), attrs=dict(attrs or {}),
                                  inputs=list(inputs), outputs=[y]))
        return y

    def ops(self, op_type: str, inputs: Sequence[gs.Tensor], roles: Sequence[str], attrs: dict | None = None,
            dtypes: Sequence[Any] | None = None) -> list[gs.Variable]:
        """Append a node with several outputs (e.g. Unique), one per role; returns them in order."""
        ys = [gs.Variable(self._name(r), dtype=d) for r, d in zip(roles, dtypes or [None] * len(roles))]
        self.nodes.append(gs.Node(op_type, self._name(f"{op_type}_{roles[0]}"), attrs=dict(attrs or {}),
                                  inputs=list(inputs), outputs=ys))
        return ys

    def adopt(self, graph: gs.Graph, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor]) -> None:
        """Append a standalone graph's nodes (e.g. an op's torch reference traced by the exporter), its
        inputs and outputs bound to `inputs` / `outputs`, every other tensor renamed under the prefix."""
        bound: dict[str, gs.Tensor] = {t.name: x for t, x in zip(graph.inputs, inputs)}
        bound |= {t.name: y for t, y in zip(graph.outputs, outputs)}

        def tensor(t: gs.Tensor) -> gs.Tensor:
            if t.name in bound:
                return bound[t.name]
            if not t.name:
                return gs.Variable.empty()
            new = gs.Constant(self._name(t.name), t.values) if isinstance(t, gs.Constant) else \
                gs.Variable(self._name(t.name), dtype=t.dtype)
            bound[t.name] = new
            return new

        for n in graph.toposort().nodes:
            self.nodes.append(gs.Node(n.op, self._name(n.name or f"{n.op}_{len(self.nodes)}"), attrs=dict(n.attrs),
                                      inputs=[tensor(t) for t in n.inputs], outputs=[tensor(t) for t in n.outputs],
                                      domain=n.domain))


def inline(spec: OpSpec, node: gs.Node, attrs: dict, prefix: str) -> list[gs.Node]:
    """The body's nodes computing `node`'s outputs from its inputs (the node itself is left to the caller)."""
    b = Body(prefix)
    spec.body(b, list(node.inputs), list(node.outputs), attrs)
    return b.nodes


def as_function(spec: OpSpec, opset: int = 18) -> gs.Function:
    """The body as a model-local function `<domain>::<name>`; attributes declared so runtimes accept them.

    Only for specs with `local_function=True`: their body must not read attributes (it gets None)."""
    inputs = [gs.Variable(n) for n in spec.inputs]
    outputs = [gs.Variable(n) for n in spec.outputs]
    b = Body()
    spec.body(b, inputs, outputs, None)  # attrs=None: a function body reads dims through Shape ops, not attributes
    attrs = {a.name: None for a in spec.attrs} | {a: None for a in PLUGIN_ATTRS}
    return gs.Function(spec.name, domain=spec.domain, nodes=b.nodes, inputs=inputs, outputs=outputs, attrs=attrs,
                       opset=opset)


def constant_values(t: gs.Tensor, what: str) -> np.ndarray:
    """The values of an op input that a constant-folding lowering needs; a named error otherwise."""
    if not isinstance(t, gs.Constant):
        raise ValueError(f"input {t.name} must be an initializer to refold {what}")
    return np.asarray(t.values)


def typed_constant(name: str, dt_vals: tuple[int, np.ndarray]) -> gs.Constant:
    """A gs.Constant of an explicit ONNX element type (dt, values): INT4/UINT4 are packed two per byte
    by onnx.helper (numpy has no 4-bit dtype), other types go through numpy as they are."""
    from onnx import TensorProto, numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    dt, vals = dt_vals
    if dt in (TensorProto.INT4, TensorProto.UINT4):  # raw_data: two codes per byte, low nibble first
        nib = (np.asarray(vals).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        t = TensorProto(name=name, data_type=dt, dims=list(vals.shape), raw_data=(nib[0::2] | (nib[1::2] << 4)).tobytes())
        return gs.Constant(name, LazyValues(t))
    return gs.Constant(name, numpy_helper.to_array(numpy_helper.from_array(vals, name)))
