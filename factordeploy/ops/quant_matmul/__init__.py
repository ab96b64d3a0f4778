"""A MatMul by a block-quantized constant weight (compress/quant.QuantizedMatrix) as one custom node.

y = x @ ((q - zero) * scale), blocks of `block` entries along K (the reduction dim):
x [..., K] (activation), q [K, N] uint8 codes in [0, 2^bits), scale [ceil(K/block), N] float,
zero [ceil(K/block), N] uint8 (ignored when symmetric: the zero is 2^(bits-1)).
Attributes: bits, block, symmetric.

A native op: no plugin and no kernel. Both runtimes read standard quantized weights:
- the body (TensorRT, and ORT's `qdq` lowering): DequantizeLinear(INT4/INT8 blocked, axis 0) + MatMul,
  the QDQ weight-only form TensorRT's parser takes (opset 21); ORT fuses it into MatMulNBits;
- `nbits` (ONNX Runtime's default): one com.microsoft MatMulNBits node with the same codes, packed as
  ONNX Runtime's own quantizer packs them, accuracy_level 4 (int8 activations: the fast CPU kernel;
  8-bit MatMulNBits at accuracy_level 0 has no fast kernel and runs ~80x slower here).
Symmetric codes are stored signed (q - 2^(bits-1), no zero-point tensor), asymmetric as unsigned
codes + unsigned zero points; TensorRT takes symmetric INT4/INT8 only (its parser refuses UINT types).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import onnx_graphsurgeon as gs

from ..body import constant_values, typed_constant
from ..spec import Attr, Lowering, OpSpec

ACCURACY_LEVEL = 4  # MatMulNBits: int8-quantized activations (MLAS fast path for 4 and 8 bits)


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    return [list(dims[0][:-1]) + [dims[1][1]]]


def dequantize(q, scale, zero, block: int):
    """(q - zero) * scale as K x N float32 (torch); symmetric weights carry zero = 2^(bits-1)."""
    K = q.shape[0]
    s = scale.float().repeat_interleave(block, 0)[:K]
    z = zero.float().repeat_interleave(block, 0)[:K]
    return (q.float() - z) * s


def reference(x, q, scale, zero, bits: int = 4, block: int = 32, symmetric: int = 1, **_attrs):
    """Torch ground truth: dequantize, one product (the zero tensor holds 2^(bits-1) when symmetric)."""
    W = dequantize(q, scale, zero, int(block))
    return ((x.float() @ W).to(x.dtype),)


def _onnx_codes(q: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool):
    """(codes tensor, zero tensor or None) as ONNX stores them: signed codes when symmetric."""
    from onnx import TensorProto, helper

    if symmetric:
        vals = q.astype(np.int16) - (1 << (bits - 1))
        dt = TensorProto.INT4 if bits == 4 else TensorProto.INT8
        return (dt, vals.astype(np.int8)), None
    dt = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
    return (dt, q.astype(np.uint8)), (dt, zero.astype(np.uint8))


def body(b, inputs, outputs, attrs) -> None:
    """DequantizeLinear(codes, scale[, zero], axis=0, block_size) -> MatMul (QDQ weight-only)."""
    x, q_t, s_t, z_t = inputs
    bits, block, sym = int(attrs["bits"]), int(attrs["block"]), bool(attrs["symmetric"])
    if bits not in (4, 8):
        raise ValueError(f"quantized matmul: a {bits}-bit weight has no DequantizeLinear form (4 and 8 only); "
                         "use the nbits lowering (ONNX Runtime)")
    q = constant_values(q_t, "quantized weight codes")
    zero = constant_values(z_t, "quantized weight zero points")
    if sym and isinstance(s_t, gs.Constant) and bool((np.asarray(s_t.values) < 0).any()):
        raise ValueError("quantized matmul: TensorRT's QDQ weights need positive scales; this weight was quantized on "
                         "ONNX Runtime's signed grid (quantize with grid='positive' for TensorRT)")
    codes, zp = _onnx_codes(q, zero, bits, sym)
    ins = [typed_constant(b._name("codes"), codes), s_t] + ([typed_constant(b._name("zero"), zp)] if zp is not None else [])
    w = b.op("DequantizeLinear", ins, "weight", attrs={"axis": 0, "block_size": block})
    b.op("MatMul", [x, w], "mm", out=outputs[0])


def pack_nbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """K x N codes -> MatMulNBits' B [N, ceil(K/block), block*bits/8]: per column, blocks along K,
    low bits first within each byte (ONNX Runtime's own packing; tested against its quantizer)."""
    K, N = q.shape
    nb = -(-K // block)
    per = 8 // bits
    cols = np.zeros((N, nb * block), dtype=np.uint8)
    cols[:, :K] = q.T
    packed = np.zeros((N, nb * block // per), dtype=np.uint8)
    for j in range(per):
        packed |= (cols[:, j::per] << (bits * j)).astype(np.uint8)
    return packed.reshape(N, nb, block * bits // 8)


def pack_zeros(zero: np.ndarray, bits: int) -> np.ndarray:
    """[nb, N] zero points -> MatMulNBits' [N * ceil(nb * bits / 8)] (per column, low bits first)."""
    nb, N = zero.shape
    per = 8 // bits
    width = -(-nb // per)
    cols = np.zeros((N, width * per), dtype=np.uint8)
    cols[:, :nb] = zero.T
    packed = np.zeros((N, width), dtype=np.uint8)
    for j in range(per):
        packed |= (cols[:, j::per] << (bits * j)).astype(np.uint8)
    return packed.reshape(-1)


def nbits_lowering(node, attrs: dict, prefix: str) -> list:
    """One com.microsoft MatMulNBits node (what ONNX Runtime's MatMulNBitsQuantizer writes)."""
    import onnx_graphsurgeon as gs

    x, q_t, s_t, z_t = node.inputs
    bits, block, sym = int(attrs["bits"]), int(attrs["block"]), bool(attrs["symmetric"])
    q = constant_values(q_t, "quantized weight codes")
    scale = constant_values(s_t, "quantized weight scales")
    K, N = q.shape
    ins = [x, gs.Constant(f"{prefix}/nbits_B", pack_nbits(q, bits, block)),
           gs.Constant(f"{prefix}/nbits_scales", np.ascontiguousarray(scale.T).reshape(-1))]
    if not sym:
        ins.append(gs.Constant(f"{prefix}/nbits_zero", pack_zeros(constant_values(z_t, "zero points"), bits)))
    return [gs.Node("MatMulNBits", f"{prefix}/MatMulNBits", domain="com.microsoft",
                    attrs={"K": K, "N": N, "bits": bits, "block_size": block, "accuracy_level": ACCURACY_LEVEL},
                    inputs=ins, outputs=list(node.outputs))]


SPEC = OpSpec(
    name="QuantMatMul",
    inputs=("x", "q", "scale", "zero"), outputs=("y",),
    input_types=("T", "uint8", "T", "uint8"), output_types=("T",),
    attrs=(Attr("bits", "int", 4, "bits per code (2, 4, 8)"),
           Attr("block", "int", 32, "codes per scale along K"),
           Attr("symmetric", "int", 1, "1: no zero points (zero = 2^(bits-1))")),
    output_shapes=_shapes,
    reference=reference,
    body=body,
    body_name="qdq",
    lowerings=(Lowering("nbits", nbits_lowering,
                        doc="one MatMulNBits node (ONNX Runtime contrib op, accuracy_level 4)"),),
    ort_default="nbits",
    native=True,
    min_opset=21,
    local_function=False,
    launch=None,
    doc=__doc__ or "",
)
