"""Custom ONNX ops that become TensorRT plugin layers (and standard ops for ONNX Runtime).

How an op registers itself
--------------------------
1. Write one module per op in `factordeploy/plugins/ops/` (e.g. `ops/sparse_dict_matmul.py`).
   Every module there is imported automatically by `all_ops()` (pkgutil discovery), so no list
   needs editing.
2. In it, describe the op once with an `OpSpec` (see plugins/spec.py) and call
   `register_op(spec)` at import time:

       from factordeploy.plugins import Attr, Launch, OpSpec, register_op
       SPEC = register_op(OpSpec(
           name="MyOp",                              # ONNX op_type == TensorRT plugin name
           inputs=("x", "w"), outputs=("y",),
           input_types=("T", "T"), output_types=("T",),
           attrs=(Attr("alpha", "float", 1.0),),
           output_shapes=lambda dims, attrs, alg: [dims[0][:-1] + [dims[1][-1]]],
           reference=my_torch_reference,             # (*tensors, **attrs) -> tuple of tensors
           decompose=my_decomposition,               # (graph, node, attrs) -> [gs.Node, ...]
           launch=my_launch,                         # (inputs, outputs, attrs) -> Launch (Triton)
       ))

   Optional fields: `aot` (full-TensorRT Quickly Deployable Plugin kernel, plugins/qdp.py) and
   `example` (inputs for benchmarks/gpu/plugin_contract.py). Put the op's Triton kernel in
   plugins/kernels/<op>.py and import it lazily inside `launch` (so TRITON_INTERPRET=1 set by tests
   before that import takes effect); use one fixed kernel config, no multi-config autotune.
3. Emit the node in the exported graph with domain "factordeploy" (`plugins.export.emit`
   wraps torch.onnx.ops.symbolic). The ONNX node's op_type must equal `name`.
4. Tests to copy: tests/test_tensorrt.py::test_engine_with_plugin_node_uses_build_time_methods
   (builds an engine with the node on CPU and compares what TensorRT configured with `reference`).

What the framework then does for every registered op
----------------------------------------------------
- TensorRT / TensorRT-RTX: `register_with_tensorrt(trt_module)` registers one IPluginCreatorV3One
  per op under namespace "factordeploy", version "1". The generic plugin class in trt_plugin.py
  implements IPluginV3 + OneCore/OneBuild/OneRuntime once: output shapes (through TensorRT's
  expression builder, so dynamic shapes work), output types, supports_format_combination
  (linear layout, the spec's type rules), attribute serialization, and `enqueue`, which wraps
  TensorRT's device pointers as torch tensors and runs `spec.launch(...)` on TensorRT's stream.
- passes.presets.trt_pipeline() stamps plugin_namespace / plugin_version on the nodes the ONNX
  parser must turn into plugins; passes.presets.ort_pipeline() replaces them by `spec.decompose`.
- Full TensorRT with `tensorrt.plugin`: plugins/qdp.py also registers a Quickly Deployable Plugin
  with an ahead-of-time Triton implementation (guarded; TensorRT-RTX has no QDP).

The API in this file and in spec.py is stable: other modules import `OpSpec`, `Attr`, `Launch`,
`register_op`, `get_op`, `all_ops`, `register_with_tensorrt`, `PLUGIN_NAMESPACE`, `PLUGIN_VERSION`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .spec import Attr, IntAlgebra, Launch, OpSpec, ShapeAlgebra

PLUGIN_NAMESPACE = "factordeploy"
PLUGIN_VERSION = "1"
DOMAIN = "factordeploy"

_OPS: dict[str, OpSpec] = {}
_discovered = False


def register_op(spec: OpSpec) -> OpSpec:
    """Add `spec` to the registry under `spec.name` (a later registration of the same name replaces it)."""
    _OPS[spec.name] = spec
    return spec


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    from . import ops

    for m in pkgutil.iter_modules(ops.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{ops.__name__}.{m.name}")
    _discovered = True


def all_ops() -> dict[str, OpSpec]:
    """Every op spec in plugins/ops/ (imports them on first call)."""
    _discover()
    return dict(_OPS)


def get_op(name: str) -> OpSpec | None:
    return all_ops().get(name)


def is_plugin_node(op_type: str, domain: str) -> bool:
    """A node the framework owns: a registered op name in our ONNX domain."""
    return domain == DOMAIN and op_type in all_ops()


def register_with_tensorrt(trt) -> list[str]:
    """Register a plugin creator for every op with `trt` (tensorrt or tensorrt_rtx_bindings). Idempotent."""
    from .trt_plugin import register_all

    return register_all(trt, list(all_ops().values()))


__all__ = ["Attr", "IntAlgebra", "Launch", "OpSpec", "ShapeAlgebra", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "DOMAIN",
           "register_op", "all_ops", "get_op", "is_plugin_node", "register_with_tensorrt"]
