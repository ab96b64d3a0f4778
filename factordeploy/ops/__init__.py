"""Custom ONNX ops: one package per op, a registry, and the shared vocabulary (spec, body, emit).

Layout (how to add an op: docs/ARCHITECTURE.md, "How to add an op"):

    ops/spec.py      OpSpec / Attr / Lowering / Launch: what an op declares (pure data + functions)
    ops/body.py      Body: the op's standard-op body written once in onnx-graphsurgeon, made into
                     the ORT lowering (inline) and the ONNX model-local function (gs.Function)
    ops/export.py    emit(): the op's node during torch.onnx export (layers call it)
    ops/<op>/        one package per op: its SPEC (name, domain, version, attributes, shape rule),
                     torch reference, body, extra lowerings + cost model, Triton kernel + launch

Everything else is generic and reads the spec: passes/custom_ops.py (plugin node for TensorRT,
lowering for ONNX Runtime chosen by the op's cost model, local function), plugins/ (one IPluginV3
implementation and one QDP registration for every op), benchmarks/gpu/plugin_contract.py.
A new op touches its own folder plus one line in OP_PACKAGES below.
"""

from __future__ import annotations

import importlib

from .spec import Attr, IntAlgebra, Launch, Lowering, OpSpec, ShapeAlgebra

DOMAIN = "factordeploy"  # ONNX domain of every op here (== TensorRT plugin namespace)
PLUGIN_NAMESPACE = DOMAIN
PLUGIN_VERSION = "1"

# The registration list: one line per op package under factordeploy/ops/.
OP_PACKAGES = (
    "sparse_dict_matmul",
    "sparse_matmul",
    "combiner_attention",
    "quant_matmul",
    "quant_gather",
)

_OPS: dict[str, OpSpec] = {}
_loaded = False


def register_op(spec: OpSpec) -> OpSpec:
    """Add `spec` under `spec.name` (a later registration of the same name replaces it; tests add their own ops)."""
    _OPS[spec.name] = spec
    return spec


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in OP_PACKAGES:
            register_op(importlib.import_module(f"{__name__}.{name}").SPEC)


def all_ops() -> dict[str, OpSpec]:
    _load()
    return dict(_OPS)


def get_op(name: str) -> OpSpec | None:
    return all_ops().get(name)


def is_custom_node(op_type: str, domain: str) -> bool:
    """A node the framework owns: a registered op name in our ONNX domain."""
    spec = all_ops().get(op_type)
    return spec is not None and domain == spec.domain


__all__ = ["Attr", "IntAlgebra", "Launch", "Lowering", "OpSpec", "ShapeAlgebra", "DOMAIN", "PLUGIN_NAMESPACE",
           "PLUGIN_VERSION", "OP_PACKAGES", "register_op", "all_ops", "get_op", "is_custom_node"]
