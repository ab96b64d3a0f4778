"""Name factorized subgraphs so later passes and reports can find them.

The dynamo exporter records each node's module path in the `namespace` metadata
("...: Cls/inner.encoder.layer.0.attention.self.query: LowRankLinear/..."). For every
node inside a factorized layer from the manifest we set the node name to
`fd/<layer>/<kind>/<op>_<i>`, and store the manifest in the model's metadata so the
information survives passes that rebuild the graph.
"""

from __future__ import annotations

import json
import re

import onnx

from .pipeline import Pass, PassContext

FD_PREFIX = "fd/"
MANIFEST_KEY = "factordeploy.layers"
_SEG = re.compile(r"(?:^|/)\s*([^/:]*?):\s")


def module_path(node: onnx.NodeProto) -> list[str]:
    """Module FQNs from outermost to innermost recorded for `node` (exporter wrapper prefix removed)."""
    for p in node.metadata_props:
        if p.key == "namespace":
            paths = [m for m in _SEG.findall(p.value) if m]
            return [m[len("inner."):] if m.startswith("inner.") else m for m in paths]
    return []


def layer_of(name: str) -> str | None:
    """The layer name encoded in a node name by this pass, else None."""
    if not name.startswith(FD_PREFIX):
        return None
    return name[len(FD_PREFIX):].rsplit("/", 2)[0]


def annotate(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    layers = ctx.layers
    counters: dict[str, int] = {}
    found: set[str] = set()
    for node in model.graph.node:
        owner = next((m for m in reversed(module_path(node)) if m in layers), None)
        if owner is None:
            continue
        i = counters.get(owner, 0)
        counters[owner] = i + 1
        node.name = f"{FD_PREFIX}{owner}/{layers[owner]['kind']}/{node.op_type}_{i}"
        found.add(owner)
    missing = sorted(set(layers) - found)
    meta = {p.key: p for p in model.metadata_props}
    if MANIFEST_KEY in meta:
        meta[MANIFEST_KEY].value = json.dumps(layers)
    else:
        model.metadata_props.add(key=MANIFEST_KEY, value=json.dumps(layers))
    ctx.note("name-factorized", layers_named=len(found), layers_missing=len(missing))
    if missing:
        ctx.note("name-factorized", missing=missing[:10])
    return model


name_factorized = Pass("name-factorized", annotate, "name each factorized layer's nodes fd/<layer>/<kind>/...")


def read_manifest(model: onnx.ModelProto) -> dict[str, dict]:
    for p in model.metadata_props:
        if p.key == MANIFEST_KEY:
            return json.loads(p.value)
    return {}


def factorized_nodes(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Nodes of each named factorized layer, in graph order (for passes, reports and tests)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        layer = layer_of(node.name)
        if layer is not None:
            out.setdefault(layer, []).append(node)
    return out
