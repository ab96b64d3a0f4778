"""TensorRT plugins for every custom op in factordeploy/ops/: shared code, no per-op code.

- trt_plugin.py: one IPluginV3 (+ OneCore/OneBuild/OneRuntime) implementation and an
  IPluginCreatorV3One creator, parameterised by an OpSpec (shapes through TensorRT's expression
  builder, types, formats, attribute serialization, `enqueue` running `spec.launch` on TensorRT's
  stream). Serves full TensorRT and TensorRT-RTX.
- qdp.py: full TensorRT with `tensorrt.plugin` only: a Quickly Deployable Plugin with the op's
  ahead-of-time Triton kernel (`spec.aot`).
- types.py: TensorRT <-> dtype-name mapping both use (so neither imports the other).

`register_with_tensorrt(trt)` registers a creator per op (QDP first where available). Ops come from
the registry in factordeploy.ops; passes/custom_ops.py stamps the plugin attributes on their nodes.
"""

from __future__ import annotations

from typing import Any

from ..ops import all_ops
from .qdp import register_qdp
from .trt_plugin import register_creator

_REGISTERED: dict[str, dict[str, Any]] = {}  # trt module name -> op -> creator / "qdp-aot" (kept alive)


def register_with_tensorrt(trt: Any) -> list[str]:
    """Register every op with `trt` (tensorrt or tensorrt_rtx_bindings); returns 'ns::name vN'. Idempotent."""
    done = _REGISTERED.setdefault(trt.__name__, {})
    names = []
    for spec in all_ops().values():
        if spec.native:  # standard ops TensorRT implements itself: no plugin to register
            continue
        if spec.name not in done:
            done[spec.name] = "qdp-aot" if register_qdp(trt, spec) else register_creator(trt, spec)
        names.append(f"{spec.namespace}::{spec.name} v{spec.version}")
    return names


__all__ = ["register_with_tensorrt"]
