"""Full TensorRT only: register each op as a Quickly Deployable Plugin (`tensorrt.plugin`).

Status: WRITTEN, NOT RUN. Full TensorRT's libraries cannot be installed on the development machine
(NVIDIA's index is unreachable) and TensorRT-RTX has no `tensorrt.plugin` module and rejects QDP
plugins ("imports IPluginV3 plugins registered with an IPluginCreatorV3One creator only"). The
TensorRT-RTX route (plugins/trt_plugin.py) is the tested one.

For an op with `spec.aot`, two QDP definitions are generated from the same OpSpec:
- `register`: the shape/type descriptor (spec.output_shapes through QDP's shape expressions,
  spec.resolve_types for dtypes),
- `aot_impl`: spec.aot compiles the Triton kernel to PTX and returns it with launch parameters;
  TensorRT embeds it in the engine, so the engine runs without Python.
No JIT `impl` is registered: defining both JIT and AOT would need the PREFER_AOT_PYTHON_PLUGINS
network flag, which polygraphy's network loader cannot set; the JIT (Python enqueue) route is the
IPluginV3 creator of trt_plugin.py, used for ops without `spec.aot` and for TensorRT-RTX.
QDP reads signatures from annotations, so the functions get an explicit `__signature__` per op.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..ops.spec import IntAlgebra, OpSpec
from .types import trt_type, trt_type_name

_REGISTERED: set[str] = set()


def qdp_module(trt: Any) -> Any | None:
    """`tensorrt.plugin` when this is full TensorRT with QDP, else None."""
    try:
        import importlib

        return importlib.import_module(trt.__name__ + ".plugin")
    except Exception:
        return None


def _annot(kind: str) -> Any:
    import numpy as np
    import numpy.typing as npt

    return {"int": int, "float": float, "ints": npt.NDArray[np.int32], "floats": npt.NDArray[np.float32]}[kind]


def _with_signature(fn: Any, params: list[inspect.Parameter], ret: Any) -> Any:
    fn.__signature__ = inspect.Signature(params, return_annotation=ret)
    fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": ret}
    return fn


def register_qdp(trt: Any, spec: OpSpec) -> bool:
    """Register `spec` with tensorrt.plugin (descriptor + AOT impl). False when QDP or spec.aot is absent."""
    trtp = qdp_module(trt)
    if trtp is None or spec.aot is None:
        return False
    qname = f"{spec.namespace}::{spec.name}"
    if qname in _REGISTERED:
        return True
    from typing import Tuple

    P = inspect.Parameter
    ins = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for n in spec.inputs]
    attrs = [P(a.name, P.POSITIONAL_OR_KEYWORD, annotation=_annot(a.kind)) for a in spec.attrs]
    out_ret = trtp.TensorDesc if spec.num_outputs == 1 else Tuple[tuple([trtp.TensorDesc] * spec.num_outputs)]

    class _ExprAlgebra(IntAlgebra):
        """The same shape algebra on QDP's symbolic sizes; only ceil-division differs."""

        def ceildiv(self, a: Any, b: Any) -> Any:
            return trtp.cdiv(a, b)

    def desc(*args: Any, **kw: Any) -> Any:
        bound = inspect.signature(desc).bind(*args, **kw)
        tds = [bound.arguments[n] for n in spec.inputs]
        values = spec.attr_values({a.name: bound.arguments[a.name] for a in spec.attrs})
        dims = [[t.shape_expr[i] for i in range(t.ndim)] for t in tds]
        shapes = spec.output_shapes(dims, values, _ExprAlgebra())
        types = spec.resolve_types([trt_type_name(t.dtype) for t in tds])
        outs = [trtp.from_shape_expr(tuple(s), dtype=trt_type(trt, ty)) for s, ty in zip(shapes, types)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    trtp.register(qname)(_with_signature(desc, ins + attrs, out_ret))

    def aot_impl(*args: Any, **kw: Any) -> Any:
        import triton

        bound = inspect.signature(aot_impl).bind(*args, **kw)
        values = spec.attr_values({a.name: bound.arguments[a.name] for a in spec.attrs})
        tds = [bound.arguments[n] for n in spec.inputs]
        k = spec.aot(tds, list(bound.arguments["outputs"]), values, trtp, [trt_type_name(t.dtype) for t in tds])
        compiled = triton.compile(triton.compiler.ASTSource(fn=k.kernel, signature=k.signature, constexprs=k.constants))
        lp = trtp.KernelLaunchParams()
        for axis, g in zip(("grid_x", "grid_y", "grid_z"), k.grid):
            setattr(lp, axis, g)
        lp.block_x = compiled.metadata.num_warps * 32
        lp.shared_mem = compiled.metadata.shared
        return (compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), lp,
                trtp.SymIntExprs.from_tuple(k.extra_args))

    trtp.aot_impl(qname)(_with_signature(aot_impl, ins + attrs + [
        P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=Tuple[trtp.TensorDesc]),
        P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)], Any))
    _REGISTERED.add(qname)
    return True
