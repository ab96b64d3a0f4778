"""Weight-only block quantization of a stored matrix: the one quantizer every layer kind uses.

A quantized matrix is stored as it is deployed (ONNX DequantizeLinear with `block_size`, which
ONNX Runtime fuses with the MatMul into MatMulNBits and TensorRT reads as QDQ weights):

* `q`     (K x N) uint8 codes in [0, 2^bits), K = the reduction (input) dimension;
* `scale` (ceil(K / block) x N) float32, one per block of `block` consecutive K entries of a column;
* `zero`  (ceil(K / block) x N) uint8; symmetric quantization stores none (the zero is 2^(bits-1)).

value = (q - zero) * scale. `stored_bytes` counts exactly that: codes at `bits` each (packed, as
ONNX stores INT4), fp32 scales, and zero points at `bits` each when asymmetric.

RTN reproduces ONNX Runtime's own block quantizer (`MatMulNBitsQuantizer`'s C++ kernels:
symmetric scale = the block's signed absolute maximum / -2^(bits-1); asymmetric over
[min(0, lo), max(0, hi)]), tested code for code against it, so "our w4" and "ORT's w4" of the same
weight are the same numbers. GPTQ (`gptq`) uses the calibration Gram matrix to pick codes that
minimise the layer's OUTPUT error instead, on the same grid (same scales, same bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.quant_matmul import dequantize  # the op's own torch reference: one dequantization for torch and graph

BITS = (2, 4, 8)  # what MatMulNBits stores; DequantizeLinear (TensorRT's QDQ weights) 4 and 8
TRT_BITS = (4, 8)
ALGOS = ("rtn", "gptq")
# symmetric grids: "signed" = ONNX Runtime's (the block's signed maximum lands on code 0, the scale may
# be negative); "positive" = scales > 0, as TensorRT's QDQ weights require (per block the best of
# absmax / 2^(b-1) (clamped), absmax / (2^(b-1) - 0.5), absmax / (2^(b-1) - 1) by squared error)
GRIDS = ("signed", "positive")


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized: bits, block length along K, symmetric or not, and the code picker."""

    bits: int = 4
    block: int = 32
    symmetric: bool = True
    algo: str = "rtn"
    grid: str = "signed"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {self.block}")
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid}")

    @property
    def tag(self) -> str:
        return (f"w{self.bits}g{self.block}" + ("" if self.symmetric else "a") + ("p" if self.symmetric and self.grid == "positive" else "")
                + ("" if self.algo == "rtn" else f"-{self.algo}"))

    def levels(self) -> int:
        return 1 << self.bits

    def blocks(self, K: int) -> int:
        return -(-K // self.block)


def quant_bytes(K: int, N: int, spec: QuantSpec) -> int:
    """Bytes of a K x N matrix stored at `spec`, as ONNX Runtime's MatMulNBits stores it (model.onnx):
    codes packed per column with K padded to whole blocks, fp32 scales, per-column packed zero points
    (asymmetric only). The TensorRT graph's DequantizeLinear form stores no padding (never more)."""
    nb = spec.blocks(K)
    codes = N * nb * spec.block * spec.bits // 8
    scales = nb * N * 4
    zeros = 0 if spec.symmetric else N * -(-nb * spec.bits // 8)
    return codes + scales + zeros


def _blocked(Wkn: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """K x N -> (nb, block, N), zero-padded along K."""
    K, N = Wkn.shape
    nb = spec.blocks(K)
    pad = nb * spec.block - K
    if pad:
        Wkn = torch.cat([Wkn, Wkn.new_zeros(pad, N)], 0)
    return Wkn.reshape(nb, spec.block, N)


def block_params(Wkn: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per block of K x N `Wkn`, as ONNX Runtime's RTN computes them (float32)."""
    Wb = _blocked(Wkn.detach().to(torch.float32), spec)
    top = spec.levels() - 1
    h = float(1 << (spec.bits - 1))
    if spec.symmetric and spec.grid == "positive":
        amax = Wb.abs().amax(dim=1)
        best, scale = None, None
        for den in (h, h - 0.5, h - 1.0):
            s = amax / den
            r = _recip(s)[:, None, :]
            err = ((torch.round(Wb * r).clamp(-h, h - 1) * s[:, None, :] - Wb) ** 2).sum(1)
            if best is None:
                best, scale = err, s
            else:
                better = err < best
                best, scale = torch.where(better, err, best), torch.where(better, s, scale)
        zero = torch.full_like(scale, h)
    elif spec.symmetric:
        # the entry of largest magnitude, with its sign, maps to code 0: scale = vmax / -2^(b-1)
        i = Wb.abs().argmax(dim=1, keepdim=True)
        vmax = torch.gather(Wb, 1, i).squeeze(1)
        scale = vmax / -h
        zero = torch.full_like(scale, h)
    else:
        lo = Wb.amin(dim=1).clamp_max(0.0)
        hi = Wb.amax(dim=1).clamp_min(0.0)
        scale = (hi - lo) / top
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / safe).clamp(0, top)
    return scale, zero.to(torch.uint8)


def _recip(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))


def codes_for(Wkn: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest codes of K x N `Wkn` on the given grid (uint8, K x N)."""
    K, N = Wkn.shape
    Wb = _blocked(Wkn.detach().to(torch.float32), spec)
    q = torch.round(Wb * _recip(scale)[:, None, :]) + zero.to(torch.float32)[:, None, :]
    q = q.clamp(0, spec.levels() - 1).reshape(-1, N)[:K]
    return q.to(torch.uint8)


def quantize_rtn(Wkn: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of K x N `Wkn` by round-to-nearest (ONNX Runtime's block quantizer)."""
    scale, zero = block_params(Wkn, spec)
    return codes_for(Wkn, scale, zero, spec), scale, zero


def quantize_gptq(Wkn: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2023) on the RTN grid: quantize K rows in order, pushing each row's
    error onto the not-yet-quantized rows through the inverse Gram (output error, not weight error).

    `gram` = X^T X of the layer input (K x K). Scales/zeros are RTN's of the original weight, so the
    bytes are those of RTN; only the codes change.
    """
    W = Wkn.detach().to(torch.float64).clone()
    K, N = W.shape
    scale, zero = block_params(Wkn, spec)
    H = gram.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(K, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s_rows = scale.to(torch.float64).repeat_interleave(spec.block, 0)[:K]
    z_rows = zero.to(torch.float64).repeat_interleave(spec.block, 0)[:K]
    r_rows = torch.where(s_rows != 0, 1.0 / torch.where(s_rows != 0, s_rows, torch.ones_like(s_rows)),
                         torch.zeros_like(s_rows))
    top = spec.levels() - 1
    Q = torch.zeros(K, N, dtype=torch.uint8, device=W.device)
    for c0 in range(0, K, chunk):
        c1 = min(K, c0 + chunk)
        Wc = W[c0:c1].clone()
        Err = torch.zeros_like(Wc)
        Hc = Hinv[c0:c1, c0:c1]
        for i in range(c1 - c0):
            k = c0 + i
            w = Wc[i]
            q = (torch.round(w * r_rows[k]) + z_rows[k]).clamp(0, top)
            Q[k] = q.to(torch.uint8)
            wq = (q - z_rows[k]) * s_rows[k]
            e = (w - wq) / Hc[i, i]
            Wc[i:] -= Hc[i, i:, None] * e[None, :]
            Err[i] = e
        W[c1:] -= Hinv[c0:c1, c1:].T @ Err
    return Q, scale, zero


class QuantizedMatrix(nn.Module):
    """A constant matrix stored as block-quantized codes, in MatMul layout (K x N = in x out).

    `weight()` is the dequantized (out x in) matrix an nn.Linear would hold. Buffers only: a
    quantized factor is frozen (recovery adapts the high-precision factors around it).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("q", q.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("zero", zero.to(torch.uint8).contiguous())

    @staticmethod
    def saves_bytes(W: torch.Tensor, spec: QuantSpec) -> bool:
        """Whether storing (out x in) `W` at `spec` takes fewer bytes than its own dtype (a rank-8 factor
        quantized along K = 8 pads to a whole block of 32 codes and would not)."""
        out_f, in_f = W.shape
        return quant_bytes(in_f, out_f, spec) < W.numel() * W.element_size()

    @classmethod
    def from_weight(cls, W: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None = None) -> "QuantizedMatrix":
        """Quantize an (out x in) nn.Linear-style weight (GPTQ needs the input Gram `gram`)."""
        Wkn = W.detach().T.contiguous()
        if spec.algo == "gptq" and gram is not None:
            q, s, z = quantize_gptq(Wkn, gram, spec)
        else:
            q, s, z = quantize_rtn(Wkn, spec)
        return cls(q, s, z, spec).to(W.device)

    @property
    def K(self) -> int:
        return self.q.shape[0]

    @property
    def N(self) -> int:
        return self.q.shape[1]

    def weight(self) -> torch.Tensor:
        """(out x in) float32: what the deployed graph multiplies by."""
        return dequantize(self.q, self.scale, self.zero, self.spec.block).T

    def stored_bytes(self) -> int:
        return quant_bytes(self.K, self.N, self.spec)

    def describe(self) -> dict:
        return {"bits": self.spec.bits, "block": self.spec.block, "symmetric": self.spec.symmetric,
                "algo": self.spec.algo, "bytes": self.stored_bytes()}

    def extra_repr(self) -> str:
        return f"{self.K}x{self.N}, {self.spec.tag}"
