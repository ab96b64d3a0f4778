"""Custom-op nodes (factordeploy/ops/) for each runtime, generically from each op's spec.

- ONNX Runtime (`lower_custom_ops`): every custom node is replaced by one of its op's lowerings
  (the standard-op body, or another declared lowering), chosen per node by the op's cost model
  under the "cost" policy or fixed per op (`policies`, e.g. `--ort-sparse-dict gather`). Each
  decision is logged with the modelled costs, so model.onnx stays portable and explainable.
- TensorRT (`plugin_inputs`, `mark_plugin_nodes`, `op_functions`): the node stays for the plugin;
  constant inputs are converted to the dtype the op declares (e.g. 1-2 byte indices widened to
  int32: TensorRT plugin I/O has no int16/uint8, the extra bytes are reported), the node gets the
  plugin_namespace / plugin_version the ONNX parser looks up, and the op's body is attached as an
  ONNX model-local function so ONNX Runtime can run the TensorRT graph as well.
Nodes of unknown custom domains are left alone; the TensorRT parse check names them.
This module never names an op or a layer kind.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UserError
from ..ops import all_ops, get_op, is_custom_node
from ..ops.body import as_function, inline
from ..ops.spec import OpSpec
from .annotate import layer_of
from .pipeline import Pass, PassContext, graph_pass


def custom_nodes(graph: gs.Graph) -> list[tuple[gs.Node, OpSpec]]:
    return [(n, get_op(n.op)) for n in graph.nodes if is_custom_node(n.op, n.domain or "")]


def check_policies(policies: dict[str, str] | None) -> dict[str, str]:
    """{op name: policy} validated against each op's declared policies (UserError naming the flag)."""
    policies = dict(policies or {})
    for name, policy in policies.items():
        spec = get_op(name)
        if spec is None:
            raise UserError(f"no custom op '{name}' to set an ONNX Runtime lowering for", "see factordeploy/ops/")
        if policy not in spec.policies():
            flag = f"--{spec.ort_flag}" if spec.ort_flag else f"the {name} lowering"
            raise UserError(f"unknown {flag} '{policy}'", "use one of " + ", ".join(spec.policies()))
    return policies


def _prefix(node: gs.Node, used: set[str] | None = None) -> str:
    """fd/<layer>/<kind>/<Op>_0 -> fd/<layer>/<kind>: replacement nodes keep mapping to their layer.

    A layer with several custom nodes (e.g. one quantized-matmul node per quantized factor) gets the node's own
    name from the second one on, so the names stay unique (`used`: prefixes taken in this graph)."""
    name = node.name or f"{node.op}_{node.outputs[0].name}"
    prefix = name.rsplit("/", 1)[0] if layer_of(name) else name
    if used is not None:
        if prefix in used:
            prefix = name
        used.add(prefix)
    return prefix


def _consts(node: gs.Node) -> list:
    return [np.asarray(t.values) if isinstance(t, gs.Constant) else None for t in node.inputs]


def choose(spec: OpSpec, node: gs.Node, attrs: dict, policy: str) -> tuple[str, dict[str, float]]:
    """The lowering `policy` names, or under "cost" the cheapest by the op's cost model (with all costs)."""
    costs = spec.cost(_consts(node), attrs) if spec.cost is not None else {}
    if policy != "cost":
        return policy, costs
    return min(costs, key=costs.get), costs


# ops whose meaning changed between opset 18 and 21 (GroupNormalization's scale/bias shape); a graph
# holding one cannot simply be relabelled to the newer opset a native op's body needs
_CHANGED_BY_21 = ("GroupNormalization",)


def raise_opset(model: onnx.ModelProto, version: int) -> bool:
    """Relabel the default-domain opset to `version` (18..21 changed no op used here); True when raised."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < version:
            bad = sorted({n.op_type for n in model.graph.node if n.op_type in _CHANGED_BY_21 and n.domain in ("", "ai.onnx")})
            if bad:
                raise ValueError(f"cannot raise opset {o.version} -> {version}: the graph holds {', '.join(bad)}")
            o.version = version
            return True
    return False


def lower_node(spec: OpSpec, node: gs.Node, attrs: dict, how: str, used: set[str] | None = None) -> list[gs.Node]:
    prefix = _prefix(node, used)
    if how == spec.body_name:
        return inline(spec, node, attrs, prefix)
    lowering = next(lw for lw in spec.lowerings if lw.name == how)
    return lowering.build(node, attrs, prefix)


def lower_custom_ops(policies: dict[str, str] | None = None) -> Pass:
    """The ORT pass: each custom node -> standard ops (policy per op name; default: the op's first policy)."""
    policies = check_policies(policies)

    @graph_pass("lower-custom-ops", "replace custom-op nodes by standard ops, per node by the op's cost model")
    def lower(graph: gs.Graph, ctx: PassContext) -> None:
        report: dict[str, dict] = {}
        used: set[str] = set()
        for node, spec in custom_nodes(graph):
            attrs = spec.attr_values(dict(node.attrs))
            policy = policies.get(spec.name, spec.default_policy())
            how, costs = choose(spec, node, attrs, policy)
            new = lower_node(spec, node, attrs, how, used)
            if how == spec.body_name and spec.min_opset:
                ctx.scratch["min_opset"] = max(ctx.scratch.get("min_opset", 0), spec.min_opset)
            node.outputs.clear()  # the lowering produces them now
            node.inputs.clear()
            graph.nodes.extend(new)
            op = report.setdefault(spec.name, {
                "policy": policy, "flag": spec.ort_flag, "layers": 0, **{h: 0 for h in spec.lowering_names()},
                "refolding": [lw.name for lw in spec.lowerings if lw.refolds], "per_layer": {}})
            op["layers"] += 1
            op[how] += 1
            op["per_layer"][layer_of(node.name or "") or node.name] = {
                "lowering": how, "modelled_us": {n: round(c * 1e6, 2) for n, c in costs.items()}}
        ctx.note("lower-custom-ops", ops=report)

    return _lowering_pass(lower, "lower-custom-ops", lambda spec: True)


def _lowering_pass(lower, name: str, selects) -> Pass:
    """Run a graphsurgeon lowering only when the graph holds a node it selects; afterwards drop unused
    custom opset imports, declare the contrib domain the lowerings may use, raise the opset bodies need."""

    def run(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        if not any(is_custom_node(n.op_type, n.domain) and selects(get_op(n.op_type)) for n in model.graph.node):
            ctx.note(name, ops={})
            return model  # graphs without such nodes skip the graphsurgeon round trip
        ctx.scratch["min_opset"] = 0
        out = lower(model, ctx)
        used = {n.domain for n in out.graph.node}
        ours = {s.domain for s in all_ops().values()}
        keep = [o for o in out.opset_import if o.domain not in ours or o.domain in used]
        del out.opset_import[:]
        out.opset_import.extend(keep)
        have = {o.domain for o in out.opset_import}
        for dom in sorted(d for d in used if d and d not in have and d not in ours):
            out.opset_import.append(onnx.helper.make_opsetid(dom, 1))
        if ctx.scratch.get("min_opset"):
            raise_opset(out, ctx.scratch["min_opset"])
        return out

    return Pass(name, run, lower.description)


@graph_pass("inline-native-ops", "TensorRT graph: native custom ops (standard-op bodies TensorRT reads, e.g. QDQ "
                                 "weights) replaced by their body")
def _inline_native(graph: gs.Graph, ctx: PassContext) -> None:
    done: dict[str, int] = {}
    used: set[str] = set()
    for node, spec in custom_nodes(graph):
        if not spec.native:
            continue
        attrs = spec.attr_values(dict(node.attrs))
        new = lower_node(spec, node, attrs, spec.body_name, used)
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend(new)
        done[spec.name] = done.get(spec.name, 0) + 1
        if spec.min_opset:
            ctx.scratch["min_opset"] = max(ctx.scratch.get("min_opset", 0), spec.min_opset)
    ctx.note("inline-native-ops", ops=done)


inline_native_ops = _lowering_pass(_inline_native, "inline-native-ops", lambda spec: spec.native)


@graph_pass("plugin-input-types", "convert constant inputs of plugin nodes to the dtypes their ops declare")
def plugin_inputs(graph: gs.Graph, ctx: PassContext) -> None:
    converted, extra = 0, 0
    seen: dict[tuple[str, str], gs.Constant] = {}
    nodes = custom_nodes(graph)
    for node, spec in nodes:
        for i, (t, want) in enumerate(zip(node.inputs, spec.input_types)):
            if want == "T" or not isinstance(t, gs.Constant):
                continue
            arr = np.asarray(t.values)
            if arr.dtype == np.dtype(want):
                continue
            key = (t.name, want)
            if key not in seen:  # a shared constant is converted once
                seen[key] = gs.Constant(f"{t.name}/{want}", arr.astype(want))
                extra += arr.size * (np.dtype(want).itemsize - arr.dtype.itemsize)
            node.inputs[i] = seen[key]
            converted += 1
    ctx.note("plugin-input-types", plugin_nodes=len(nodes), inputs_converted=converted, extra_bytes=extra)


def _mark(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    marked = 0
    for n in model.graph.node:
        if not is_custom_node(n.op_type, n.domain):
            continue
        spec = get_op(n.op_type)
        want = {"plugin_namespace": spec.namespace, "plugin_version": spec.version}
        keep = [a for a in n.attribute if a.name not in want]
        del n.attribute[:]
        n.attribute.extend(keep + [onnx.helper.make_attribute(k, v) for k, v in want.items()])
        marked += 1
    ctx.note("mark-plugin-nodes", plugin_nodes=marked)
    return model


mark_plugin_nodes = Pass("mark-plugin-nodes", _mark,
                         "give plugin nodes plugin_namespace/plugin_version for the TensorRT parser")


def _functions(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    present = {(f.domain, f.name) for f in model.functions}
    attached = []
    for name in sorted({n.op_type for n in model.graph.node if is_custom_node(n.op_type, n.domain)}):
        spec = get_op(name)
        if spec.local_function and (spec.domain, spec.name) not in present:
            model.functions.append(OnnxExporter.export_function(as_function(spec)))
            attached.append(name)
    ctx.note("op-functions", attached=attached)
    return model


op_functions = Pass("op-functions", _functions,
                    "ship each custom op's standard-op body as an ONNX local function (ORT runs the TensorRT graph)")
