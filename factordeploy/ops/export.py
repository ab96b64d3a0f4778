"""Emit a custom op's node from torch during ONNX export (dynamo exporter): what layers call.

Inside a module's forward:

    if torch.onnx.is_in_onnx_export():
        return emit(SPEC, (x, w), {"alpha": 0.5}, reference=lambda: SPEC.reference(x, w, alpha=0.5))
    return SPEC.reference(x, w, alpha=0.5)[0]

`emit` computes the output shape with the spec's own shape rule on the (possibly symbolic) torch
sizes, so dynamic batch/sequence dims flow through, and writes every declared attribute (defaults
filled in) so the TensorRT plugin and the ORT decomposition see identical values.
"""

from __future__ import annotations

from typing import Any, Sequence

from .spec import IntAlgebra, OpSpec


def emit(spec: OpSpec, inputs: Sequence[Any], attrs: dict | None = None, out_dtype: Any = None) -> Any:
    """One `<domain>::<name>` node; returns its (single) output tensor. Multi-output ops: use symbolic_multi_out."""
    import torch

    if spec.num_outputs != 1:
        raise NotImplementedError(f"{spec.name}: emit() handles single-output ops")
    values = spec.attr_values(attrs)
    dims = [list(t.shape) for t in inputs]
    shape = spec.output_shapes(dims, values, IntAlgebra())[0]
    dtype = out_dtype if out_dtype is not None else next(
        (t.dtype for t, k in zip(inputs, spec.input_types) if k == "T"), torch.float32)
    return torch.onnx.ops.symbolic(f"{spec.domain}::{spec.name}", list(inputs), values, dtype=dtype, shape=shape,
                                   version=int(spec.version))
