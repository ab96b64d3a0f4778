"""A lookup in a block-quantized table (compress/layers.QuantEmbedding) as one custom node.

y = codes[ids] * scale[ids] per block: codes [V, D] int8 holding signed codes (in [-127, 127] at 8 bits,
[-8, 7] at 4 bits), scale [V, D / block] float, ids int64 of any shape -> y [*ids.shape, D].
Attributes: bits (4 or 8), block (entries per scale along D; D itself = one scale per row).
A native op: no plugin and no kernel, two standard forms of the same stored codes:
- the body (TensorRT): DequantizeLinear(INT8 / INT4 codes, scale) -> Gather, the form TensorRT's parser
  takes for a quantized constant (it refuses an int8 constant that does not feed a DequantizeLinear);
- `lookup` (ONNX Runtime's default): only the rows read are dequantized: 8 bits per row as
  Gather(codes) -> Cast -> Gather(scale) -> Mul; 4 bits as one com.microsoft GatherBlockQuantized
  (INT4 codes, what ONNX Runtime's own quantizer writes for a Gather). The body would dequantize the
  whole table at every call (a 49152 x 576 table at every decode step).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..body import constant_values, typed_constant
from ..spec import Attr, Lowering, OpSpec


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    return [list(dims[2]) + [dims[0][1]]]


def dequantize_rows(codes, scale):
    """codes [..., D] * scale [..., D / block] broadcast per block (torch)."""
    nb = scale.shape[-1]
    c = codes.to(scale.dtype)
    return (c.reshape(*c.shape[:-1], nb, -1) * scale[..., None]).reshape(c.shape)


def reference(codes, scale, ids, **_attrs):
    """Torch ground truth: the rows, dequantized."""
    return (dequantize_rows(codes[ids], scale[ids]),)


def _codes(q_t, bits: int):
    from onnx import TensorProto

    q = constant_values(q_t, "embedding codes").astype(np.int8)
    return (TensorProto.INT4 if bits == 4 else TensorProto.INT8), q


def body(b, inputs, outputs, attrs) -> None:
    """DequantizeLinear(codes, scale; per row: axis 0, blocked: axis 1 + block_size) -> Gather."""
    import onnx_graphsurgeon as gs

    q_t, s_t, ids = inputs
    bits, block = int(attrs["bits"]), int(attrs["block"])
    s = constant_values(s_t, "embedding scales")
    codes = typed_constant(b._name("codes"), _codes(q_t, bits))
    if s.shape[1] == 1:  # one scale per row
        table = b.op("DequantizeLinear", [codes, gs.Constant(b._name("row_scale"), np.ascontiguousarray(s.reshape(-1)))],
                     "table", attrs={"axis": 0})
    else:
        table = b.op("DequantizeLinear", [codes, s_t], "table", attrs={"axis": 1, "block_size": block})
    b.op("Gather", [table, ids], "rows", attrs={"axis": 0}, out=outputs[0])


def lookup_lowering(node, attrs: dict, prefix: str) -> list:
    """Dequantize only the rows read (plain ONNX at 8 bits per row, GatherBlockQuantized otherwise)."""
    import onnx_graphsurgeon as gs
    from onnx import TensorProto

    q_t, s_t, ids = node.inputs
    bits, block = int(attrs["bits"]), int(attrs["block"])
    s = constant_values(s_t, "embedding scales")
    if bits == 4 or s.shape[1] > 1:
        codes = typed_constant(f"{prefix}/codes", _codes(q_t, bits))
        return [gs.Node("GatherBlockQuantized", f"{prefix}/GatherBlockQuantized", domain="com.microsoft",
                        attrs={"block_size": block, "gather_axis": 0, "quantize_axis": 1},
                        inputs=[codes, ids, s_t], outputs=list(node.outputs))]
    dt = s.dtype
    rows = gs.Variable(f"{prefix}/rows", dtype=np.int8)
    rows_f = gs.Variable(f"{prefix}/rows_f", dtype=dt)
    sc = gs.Variable(f"{prefix}/row_scales", dtype=dt)
    to = TensorProto.FLOAT16 if dt == np.float16 else TensorProto.FLOAT
    return [gs.Node("Gather", f"{prefix}/gather_codes", attrs={"axis": 0}, inputs=[q_t, ids], outputs=[rows]),
            gs.Node("Cast", f"{prefix}/cast", attrs={"to": to}, inputs=[rows], outputs=[rows_f]),
            gs.Node("Gather", f"{prefix}/gather_scales", attrs={"axis": 0}, inputs=[s_t, ids], outputs=[sc]),
            gs.Node("Mul", f"{prefix}/mul", inputs=[rows_f, sc], outputs=list(node.outputs))]


SPEC = OpSpec(
    name="QuantGather",
    inputs=("codes", "scale", "ids"), outputs=("y",),
    input_types=("int8", "T", "int64"), output_types=("T",),
    attrs=(Attr("bits", "int", 8, "bits per code (4 or 8)"),
           Attr("block", "int", 0, "codes per scale along D (D: one scale per row)")),
    output_shapes=_shapes,
    reference=reference,
    body=body,
    body_name="qdq",
    lowerings=(Lowering("lookup", lookup_lowering, doc="dequantize only the rows read (Gather/Cast/Mul or GatherBlockQuantized)"),),
    ort_default="lookup",
    native=True,
    min_opset=21,
    local_function=False,
    launch=None,
    doc=__doc__ or "",
)
