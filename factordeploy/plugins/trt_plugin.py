"""One generic IPluginV3 implementation + IPluginCreatorV3One, parameterised by an OpSpec.

The same code serves full TensorRT (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx_bindings`): the
classes are created per TensorRT module by `plugin_classes(trt, spec)` because their base classes
come from that module. TensorRT-RTX only accepts this route (IPluginV3 with an IPluginCreatorV3One
creator, reached through the ONNX parser: the node's op_type is the creator name, its
plugin_namespace/plugin_version attributes select the namespace and version).

Build-time methods (run on this CPU machine during an engine build): get_capability_interface,
clone, get_output_data_types, get_output_shapes, supports_format_combination, configure_plugin,
get_workspace_size, get_valid_tactics, get_fields_to_serialize. Runtime methods (need a GPU):
on_shape_change, attach_to_context, set_tactic, enqueue. `CALLS[op]` counts every call and
`SEEN[op]` keeps what TensorRT handed the plugin, so tests can prove the build used them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from ..ops.spec import OpSpec
from .types import trt_type, trt_type_name

CALLS: dict[str, Counter] = defaultdict(Counter)
SEEN: dict[str, dict[str, Any]] = defaultdict(dict)

_CLASSES: dict[tuple[str, str], tuple[type, type]] = {}


class TrtAlgebra:
    """ShapeAlgebra over TensorRT's IExprBuilder (symbolic dims for dynamic shapes)."""

    def __init__(self, trt: Any, builder: Any) -> None:
        self.trt, self.b = trt, builder

    def const(self, v: int) -> Any:
        return self.b.constant(int(v))

    def _op(self, op: str, a: Any, b: Any) -> Any:
        a = self.const(a) if isinstance(a, (int, np.integer)) else a
        b = self.const(b) if isinstance(b, (int, np.integer)) else b
        return self.b.operation(getattr(self.trt.DimensionOperation, op), a, b)

    def add(self, a: Any, b: Any) -> Any:
        return self._op("SUM", a, b)

    def sub(self, a: Any, b: Any) -> Any:
        return self._op("SUB", a, b)

    def mul(self, a: Any, b: Any) -> Any:
        return self._op("PROD", a, b)

    def floordiv(self, a: Any, b: Any) -> Any:
        return self._op("FLOOR_DIV", a, b)

    def ceildiv(self, a: Any, b: Any) -> Any:
        return self._op("CEIL_DIV", a, b)


def _fields(trt: Any, spec: OpSpec, values: dict[str, Any] | None) -> Any:
    """PluginFieldCollection for the spec's attributes (values=None: the creator's declaration)."""
    out = []
    for a in spec.attrs:
        is_int = a.kind in ("int", "ints")
        dtype = np.int32 if is_int else np.float32
        ftype = trt.PluginFieldType.INT32 if is_int else trt.PluginFieldType.FLOAT32
        data = np.array([], dtype=dtype) if values is None else np.atleast_1d(np.asarray(values[a.name], dtype=dtype))
        out.append(trt.PluginField(a.name, data, ftype))
    return trt.PluginFieldCollection(out)


def _decode_fields(spec: OpSpec, fc: Any) -> dict[str, Any]:
    given = {}
    for f in fc or []:
        if any(a.name == f.name for a in spec.attrs):
            given[f.name] = np.array(f.data)
    return spec.attr_values(given)


class _DevicePtr:
    """Minimal __cuda_array_interface__ so torch.as_tensor can view a TensorRT device buffer."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (int(ptr), False),
                                         "version": 2, "strides": None}


def device_tensor(ptr: int, dims: Any, dtype_name: str) -> Any:
    """A torch tensor viewing `ptr` (no copy). bf16 goes through int16 (CAI has no bfloat16 typestr)."""
    import torch

    shape = tuple(int(d) for d in dims)
    typestr = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "int32": "<i4", "int64": "<i8",
               "int8": "|i1", "uint8": "|u1", "bool": "|b1"}[dtype_name]
    t = torch.as_tensor(_DevicePtr(ptr, shape, typestr), device="cuda")
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def plugin_classes(trt: Any, spec: OpSpec) -> tuple[type, type]:
    """(Plugin, Creator) classes for `spec` bound to the TensorRT module `trt` (cached)."""
    key = (trt.__name__, spec.name)
    if key in _CLASSES:
        return _CLASSES[key]
    calls, seen = CALLS[spec.name], SEEN[spec.name]

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict[str, Any], phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = spec.name
            self.plugin_version = spec.version
            self.plugin_namespace = spec.namespace
            self.num_outputs = spec.num_outputs
            self.timing_cache_id = ""
            self.attrs = dict(attrs)
            self.phase = phase
            self.in_dims: list[tuple[int, ...]] = []
            self.out_dims: list[tuple[int, ...]] = []

        # --- core / lifecycle
        def get_capability_interface(self, type: Any) -> Any:
            calls["get_capability_interface"] += 1
            return self

        def clone(self) -> Any:
            calls["clone"] += 1
            p = Plugin(self.attrs, self.phase)
            p.in_dims, p.out_dims = list(self.in_dims), list(self.out_dims)
            return p

        # --- build
        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            calls["get_output_data_types"] += 1
            names = spec.resolve_types([trt_type_name(t) for t in input_types])
            seen["input_types"] = [trt_type_name(t) for t in input_types]
            seen["output_types"] = names
            return [trt_type(trt, n) for n in names]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
            calls["get_output_shapes"] += 1
            dims = [[d[i] for i in range(len(d))] for d in inputs]
            outs = spec.output_shapes(dims, self.attrs, TrtAlgebra(trt, expr_builder))
            result = []
            for o in outs:
                de = trt.DimsExprs(len(o))
                for i, d in enumerate(o):
                    de[i] = expr_builder.constant(int(d)) if isinstance(d, (int, np.integer)) else d
                result.append(de)
            return result

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            calls["supports_format_combination"] += 1
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            earlier = [trt_type_name(in_out[i].desc.type) for i in range(pos)]
            return spec.accepts(pos, trt_type_name(desc.type), earlier)

        def configure_plugin(self, inp: list[Any], out: list[Any]) -> None:
            calls["configure_plugin"] += 1
            seen["configured"] = {
                "inputs": [{"min": tuple(d.min), "opt": tuple(d.opt), "max": tuple(d.max),
                            "type": trt_type_name(d.desc.type)} for d in inp],
                "outputs": [{"min": tuple(d.min), "opt": tuple(d.opt), "max": tuple(d.max),
                             "type": trt_type_name(d.desc.type)} for d in out],
            }

        def get_workspace_size(self, inp: list[Any], out: list[Any]) -> int:
            calls["get_workspace_size"] += 1
            return 0

        def get_valid_tactics(self) -> list[int]:
            calls["get_valid_tactics"] += 1
            return []

        def get_fields_to_serialize(self) -> Any:
            calls["get_fields_to_serialize"] += 1
            return _fields(trt, spec, self.attrs)

        # --- runtime (GPU only)
        def set_tactic(self, tactic: int) -> None:
            calls["set_tactic"] += 1

        def on_shape_change(self, inp: list[Any], out: list[Any]) -> None:
            calls["on_shape_change"] += 1
            self.in_dims = [tuple(d.dims) for d in inp]
            self.out_dims = [tuple(d.dims) for d in out]

        def attach_to_context(self, context: Any) -> Any:
            calls["attach_to_context"] += 1
            return self.clone()

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int], outputs: list[int],
                    workspace: int, stream: int) -> None:
            """Launch the op's Triton kernel on TensorRT's stream (buffers viewed as torch tensors, no copies)."""
            import torch

            calls["enqueue"] += 1
            ins = [device_tensor(p, d.dims, trt_type_name(d.type)) for p, d in zip(inputs, input_desc)]
            outs = [device_tensor(p, d.dims, trt_type_name(d.type)) for p, d in zip(outputs, output_desc)]
            with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
                spec.launch(ins, outs, self.attrs)()

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = spec.name
            self.plugin_namespace = spec.namespace
            self.plugin_version = spec.version
            self.field_names = _fields(trt, spec, None)

        def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
            calls["create_plugin"] += 1
            attrs = _decode_fields(spec, fc)
            seen["attrs"] = dict(attrs)
            return Plugin(attrs, phase)

    Plugin.__name__ = Plugin.__qualname__ = f"{spec.name}Plugin"
    Creator.__name__ = Creator.__qualname__ = f"{spec.name}PluginCreator"
    _CLASSES[key] = (Plugin, Creator)
    return Plugin, Creator


def register_creator(trt: Any, spec: OpSpec) -> Any:
    """Register `spec`'s creator with trt's plugin registry; returns it (the caller keeps it alive:
    TensorRT holds only a raw pointer)."""
    _, Creator = plugin_classes(trt, spec)
    creator = Creator()
    if not trt.get_plugin_registry().register_creator(creator, spec.namespace):
        raise RuntimeError(f"TensorRT refused to register plugin creator {spec.namespace}::{spec.name}")
    return creator
