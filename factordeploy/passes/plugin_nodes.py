"""Plugin nodes (custom-domain ops from factordeploy.plugins) for each runtime.

- TensorRT: `mark_plugin_nodes` gives each plugin node the `plugin_namespace` / `plugin_version`
  attributes the ONNX parser uses to find the registered creator (name == op_type).
- ONNX Runtime: `decompose_plugin_nodes` replaces each plugin node by its op spec's standard-op
  decomposition, so model.onnx stays portable (no custom-op library needed).
Both start from the same exported model. Nodes of unknown custom domains are left alone here;
the TensorRT parse check (engines/tensorrt.check_parsable) reports them by name and op type.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..plugins import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, get_op, is_plugin_node
from .pipeline import Pass, PassContext


def _mark(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    marked = 0
    for n in model.graph.node:
        if not is_plugin_node(n.op_type, n.domain):
            continue
        spec = get_op(n.op_type)
        want = {"plugin_namespace": spec.namespace if spec else PLUGIN_NAMESPACE,
                "plugin_version": spec.version if spec else PLUGIN_VERSION}
        keep = [a for a in n.attribute if a.name not in want]
        del n.attribute[:]
        n.attribute.extend(keep + [onnx.helper.make_attribute(k, v) for k, v in want.items()])
        marked += 1
    ctx.note("mark-plugin-nodes", plugin_nodes=marked)
    return model


mark_plugin_nodes = Pass("mark-plugin-nodes", _mark,
                         "give plugin nodes plugin_namespace/plugin_version for the TensorRT parser")


def _decompose(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    if not any(is_plugin_node(n.op_type, n.domain) for n in model.graph.node):
        ctx.note("decompose-plugin-nodes", decomposed=0)
        return model  # untouched: graphs without plugin nodes skip the graphsurgeon round trip
    graph = gs.import_onnx(model)
    count = 0
    for n in list(graph.nodes):
        if not is_plugin_node(n.op, n.domain or ""):
            continue
        spec = get_op(n.op)
        attrs = spec.attr_values({k: v for k, v in n.attrs.items()})
        new_nodes = spec.decompose(graph, n, attrs)
        n.outputs.clear()  # the decomposition now produces them
        n.inputs.clear()
        graph.nodes.extend(new_nodes)
        count += 1
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    if count and not any(nd.domain == DOMAIN for nd in out.graph.node):
        keep = [o for o in out.opset_import if o.domain != DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    ctx.note("decompose-plugin-nodes", decomposed=count)
    return out


decompose_plugin_nodes = Pass("decompose-plugin-nodes", _decompose,
                              "replace plugin nodes by their standard-op decomposition (ONNX Runtime)")
