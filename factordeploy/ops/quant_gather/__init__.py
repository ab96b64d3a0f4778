"""A lookup in an int8 table with one scale per row (compress/layers.QuantEmbedding) as one custom node.

y = codes[ids] * scale[ids]: codes [V, D] int8, scale [V, 1] float, ids int64 of any shape ->
y [*ids.shape, D]. A native op: no plugin and no kernel, two standard forms of the same stored codes:
- the body (TensorRT): DequantizeLinear(codes, scale, axis 0) -> Gather, the form TensorRT's parser
  takes for a quantized constant (it refuses an int8 constant that does not feed a DequantizeLinear);
- `lookup` (ONNX Runtime's default): Gather(codes) -> Cast -> Gather(scale) -> Mul, so each call
  dequantizes only the rows it reads (the body would dequantize the whole table every call: a
  49152 x 576 table at every decode step).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..body import constant_values
from ..spec import Lowering, OpSpec


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    return [list(dims[2]) + [dims[0][1]]]


def reference(codes, scale, ids, **_attrs):
    """Torch ground truth: the rows, dequantized."""
    return (codes[ids].to(scale.dtype) * scale[ids],)


def _scale_vector(s_t) -> Any:
    import onnx_graphsurgeon as gs

    s = constant_values(s_t, "embedding scales")
    return gs.Constant(s_t.name + "/per_row", np.ascontiguousarray(s.reshape(-1)))


def body(b, inputs, outputs, attrs) -> None:
    """DequantizeLinear(codes, per-row scale, axis=0) -> Gather (QDQ weight-only table)."""
    codes, s_t, ids = inputs
    table = b.op("DequantizeLinear", [codes, _scale_vector(s_t)], "table", attrs={"axis": 0})
    b.op("Gather", [table, ids], "rows", attrs={"axis": 0}, out=outputs[0])


def lookup_lowering(node, attrs: dict, prefix: str) -> list:
    """Gather the int8 rows and their scales, multiply (plain ONNX; only the looked-up rows are dequantized)."""
    import onnx_graphsurgeon as gs
    from onnx import TensorProto

    codes, s_t, ids = node.inputs
    dt = s_t.dtype if getattr(s_t, "dtype", None) is not None else np.float32
    rows = gs.Variable(f"{prefix}/rows", dtype=np.int8)
    rows_f = gs.Variable(f"{prefix}/rows_f", dtype=dt)
    sc = gs.Variable(f"{prefix}/row_scales", dtype=dt)
    to = {np.dtype(np.float16): TensorProto.FLOAT16}.get(np.dtype(dt), TensorProto.FLOAT)
    return [gs.Node("Gather", f"{prefix}/gather_codes", attrs={"axis": 0}, inputs=[codes, ids], outputs=[rows]),
            gs.Node("Cast", f"{prefix}/cast", attrs={"to": to}, inputs=[rows], outputs=[rows_f]),
            gs.Node("Gather", f"{prefix}/gather_scales", attrs={"axis": 0}, inputs=[s_t, ids], outputs=[sc]),
            gs.Node("Mul", f"{prefix}/mul", inputs=[rows_f, sc], outputs=list(node.outputs))]


SPEC = OpSpec(
    name="QuantGather",
    inputs=("codes", "scale", "ids"), outputs=("y",),
    input_types=("int8", "T", "int64"), output_types=("T",),
    attrs=(),
    output_shapes=_shapes,
    reference=reference,
    body=body,
    body_name="qdq",
    lowerings=(Lowering("lookup", lookup_lowering, doc="Gather + Cast + Gather + Mul (only the rows read)"),),
    ort_default="lookup",
    native=True,
    min_opset=13,
    local_function=False,
    launch=None,
    doc=__doc__ or "",
)
