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


def _prefix(node: gs.Node) -> str:
    """fd/<layer>/<kind>/<Op>_0 -> fd/<layer>/<kind>: replacement nodes keep mapping to their layer."""
    name = node.name or f"{node.op}_{node.outputs[0].name}"
    return name.rsplit("/", 1)[0] if layer_of(name) else name


def _consts(node: gs.Node) -> list:
    return [np.asarray(t.values) if isinstance(t, gs.Constant) else None for t in node.inputs]


def choose(spec: OpSpec, node: gs.Node, attrs: dict, policy: str) -> tuple[str, dict[str, float]]:
    """The lowering `policy` names, or under "cost" the cheapest by the op's cost model (with all costs)."""
    costs = spec.cost(_consts(node), attrs) if spec.cost is not None else {}
    if policy != "cost":
        return policy, costs
    return min(costs, key=costs.get), costs


def lower_node(spec: OpSpec, node: gs.Node, attrs: dict, how: str) -> list[gs.Node]:
    if how == spec.body_name:
        return inline(spec, node, attrs, _prefix(node))
    lowering = next(lw for lw in spec.lowerings if lw.name == how)
    return lowering.build(node, attrs, _prefix(node))


def lower_custom_ops(policies: dict[str, str] | None = None) -> Pass:
    """The ORT pass: each custom node -> standard ops (policy per op name; default: the op's first policy)."""
    policies = check_policies(policies)

    @graph_pass("lower-custom-ops", "replace custom-op nodes by standard ops, per node by the op's cost model")
    def lower(graph: gs.Graph, ctx: PassContext) -> None:
        report: dict[str, dict] = {}
        for node, spec in custom_nodes(graph):
            attrs = spec.attr_values(dict(node.attrs))
            policy = policies.get(spec.name, spec.default_policy())
            how, costs = choose(spec, node, attrs, policy)
            new = lower_node(spec, node, attrs, how)
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

    def run(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        if not any(is_custom_node(n.op_type, n.domain) for n in model.graph.node):
            ctx.note("lower-custom-ops", ops={})
            return model  # graphs without custom nodes skip the graphsurgeon round trip
        out = lower(model, ctx)
        used = {n.domain for n in out.graph.node}
        ours = {s.domain for s in all_ops().values()}
        keep = [o for o in out.opset_import if o.domain not in ours or o.domain in used]
        del out.opset_import[:]
        out.opset_import.extend(keep)
        return out

    return Pass(lower.name, run, lower.description)


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
