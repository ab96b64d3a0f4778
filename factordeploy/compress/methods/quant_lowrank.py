"""`quant-lowrank`: low-rank-corrected weight-only quantization, W ~ Q_b(W - B A) + B A.

Per layer (LQER / ZeroQuant-V2's LoRC / SVDQuant / CALDERA's recipe, fitted on calibration
OUTPUT error): start from C = 0, then alternate `--rounds` times

    Q = Q_b(W - C)                    (RTN, or GPTQ on the calibration Gram with --quant-algo gptq)
    C = rank-r whitened SVD of W - Q  (compress/linalg.whitened_svd: minimises ||X (W - Q - C)^T||)

keeping the round with the lowest output error ||(W - Q - C) L|| (L L^T = X^T X). The correction
is stored at `--lowrank-bits` (8: block-quantized like any factor, after recovery training; 32: fp32).
The rank comes from `--rank`, or from `--lowrank-bytes` (the correction's bytes as a fraction of the
layer's fp32 bytes). Plain quantization at a finer block that fits the same total bytes is a
candidate too, so a layer is never stored worse than plain quantization at its bytes.
`--ratio` is not used (the bytes follow from --bits, --quant-block and the rank).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError
from ...progress import track
from ...ranges import WIDEST
from ..base import CompressContext, CompressResult, Method, MethodOption, register, replace_layer
from ..layers import DenseLinear, QuantLowRankLinear, balance_factors
from ..linalg import gram_factor, whitened_svd
from ..quant import QuantizedMatrix, QuantSpec, quant_bytes

ALLOWED_BITS = (2, 4, 8)
BITS = MethodOption("bits", int, 4, "bits of the quantized residual", min=2, max=8, one_of=ALLOWED_BITS)
RANK = MethodOption("rank", int, 0, "rank of the low-rank correction (0: from --lowrank-bytes)", min=0, limit=WIDEST)
LR_BYTES = MethodOption("lowrank-bytes", float, 0.02,
                        "bytes of the correction as a fraction of the layer's fp32 bytes (when --rank is 0)",
                        min=0.0, max=1.0)
LR_BITS = MethodOption("lowrank-bits", int, 8, "storage of the correction factors: 8 (block-quantized) or 32 (fp32)",
                       min=8, max=32, one_of=(8, 32))
ROUNDS = MethodOption("rounds", int, 4, "alternations between quantizing the residual and refitting the correction",
                      min=1, max=64)


def output_err(W: torch.Tensor, W_hat: torch.Tensor, L: torch.Tensor) -> float:
    """||(W - W_hat) L||_F = ||X (W - W_hat)^T||_F."""
    return float(((W.to(torch.float64) - W_hat.to(torch.float64)) @ L).norm())


def lowrank_bytes(out_f: int, in_f: int, r: int, spec: QuantSpec | None) -> int:
    """Bytes of A (r x in) + B (out x r) stored at `spec` (None: fp32); a factor is only quantized where it saves bytes."""
    def one(K: int, N: int) -> int:
        fp = K * N * 4
        return min(fp, quant_bytes(K, N, spec)) if spec is not None else fp
    return one(in_f, r) + one(r, out_f) if r > 0 else 0


def rank_for(out_f: int, in_f: int, frac: float, spec: QuantSpec | None) -> int:
    """Largest rank whose correction fits `frac` of the layer's fp32 bytes."""
    budget = frac * out_f * in_f * 4
    r = 0
    while r < min(out_f, in_f) and lowrank_bytes(out_f, in_f, r + 1, spec) <= budget:
        r += 1
    return r


def quantize_residual(R: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None) -> QuantizedMatrix:
    return QuantizedMatrix.from_weight(R, spec, gram=gram)


def fit_layer(W: torch.Tensor, G: torch.Tensor, spec: QuantSpec, rank: int, rounds: int,
              lr_spec: QuantSpec | None, L: torch.Tensor | None = None
              ) -> tuple[QuantizedMatrix, torch.Tensor, torch.Tensor, list[float]]:
    """The alternating fit; returns (Q, A, B, output error per round) of the best round.
    `L`: G's factor (gram_factor(G)) where the caller already has it."""
    W = W.detach().to(torch.float32)
    L = gram_factor(G) if L is None else L
    Wd = W.to(torch.float64)
    C = torch.zeros_like(Wd)
    best, errs = None, []
    for _ in range(rounds):
        Q = quantize_residual((Wd - C).to(torch.float32), spec, G)
        f = whitened_svd((Wd - Q.weight().to(torch.float64)).to(torch.float32), L, rank)
        A, B = balance_factors(f.A.to(torch.float32), f.B.to(torch.float32))
        if lr_spec is not None:  # measure what will be stored: the correction at its own width
            A_s = QuantizedMatrix.from_weight(A, lr_spec).weight() if QuantizedMatrix.saves_bytes(A, lr_spec) else A
            B_s = QuantizedMatrix.from_weight(B, lr_spec).weight() if QuantizedMatrix.saves_bytes(B, lr_spec) else B
        else:
            A_s, B_s = A, B
        C = B_s.to(torch.float64) @ A_s.to(torch.float64)
        err = output_err(Wd, Q.weight().to(torch.float64) + C, L)
        errs.append(err)
        if best is None or err < best[0]:
            best = (err, Q, A, B)
    return best[1], best[2], best[3], errs


@register
class QuantLowRankMethod(Method):
    name = "quant-lowrank"
    default_calib_mode = "sequential"  # measured better (issue 21): SmolLM2 w4 GPTQ: 1.23x -> 1.18x worst domain
    summary = "low-rank-corrected quantization: W ~ Q_b(W - BA) + BA, BA fitted on calibration output error"
    needs_calibration = True
    options = (BITS, RANK, LR_BYTES, LR_BITS, ROUNDS)

    def check_options(self, options: dict) -> None:
        if options.get("bits") not in ALLOWED_BITS:
            raise UserError(f"--bits {options.get('bits')} is not supported for quant-lowrank",
                            "use --bits 2, 4 or 8 (what ONNX Runtime's MatMulNBits stores)")
        if options.get("lowrank_bits") not in (8, 32):
            raise UserError(f"--lowrank-bits {options.get('lowrank_bits')} is not supported",
                            "use --lowrank-bits 8 (block-quantized correction) or 32 (fp32)")

    def validate_model(self, model: nn.Module, targets: list[str], options: dict) -> None:
        """A --rank above a targeted layer's smaller dimension is a one-line error before calibration (the
        build calls this once the targets are known; --rank above every width is refused even earlier, by
        RANK.limit before any weight is loaded)."""
        r = int(options.get("rank") or 0)
        if r:
            for n in targets:
                w = model.get_submodule(n).weight
                if r > min(w.shape):
                    raise UserError(f"--rank {r} exceeds layer {n} ({w.shape[0]} x {w.shape[1]}: rank at most {min(w.shape)})",
                                    f"use --rank {min(w.shape)} or less, or --lowrank-bytes")

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        calib = ctx.require_calibration()
        opts = ctx.options
        self.validate_model(model, targets, opts)
        q = dict(ctx.quant)
        spec = QuantSpec(int(opts["bits"]), int(q.get("block", 32)), bool(q.get("symmetric", True)),
                         str(q.get("algo", "rtn")), str(q.get("grid", "signed")))
        lr_spec = (QuantSpec(8, spec.block, True, "rtn", spec.grid) if int(opts["lowrank_bits"]) == 8 else None)
        grams = calib.grams(model, targets)
        records, notes = [], []
        chose_plain = 0
        for name in track(targets, "quant-lowrank layers"):
            layer = model.get_submodule(name)
            W = layer.weight.detach().to(ctx.device)
            out_f, in_f = W.shape
            r = int(opts["rank"]) or rank_for(out_f, in_f, float(opts["lowrank_bytes"]), lr_spec)
            G = grams[name].to(ctx.device)
            L = gram_factor(G)
            candidates = []
            if r > 0:
                Q, A, B, errs = fit_layer(W, G, spec, r, int(opts["rounds"]), lr_spec, L)
                total = Q.stored_bytes() + lowrank_bytes(out_f, in_f, r, lr_spec)
                new = QuantLowRankLinear(Q, A.to(W.dtype), B.to(W.dtype), layer.bias)
                if lr_spec is not None:
                    new.pending_quant = {"A": lr_spec, "B": lr_spec}
                candidates.append((errs[min(range(len(errs)), key=errs.__getitem__)], total, new,
                                   {"rounds_output_error": [round(e, 6) for e in errs]}))
            else:
                total = quant_bytes(in_f, out_f, spec)
            # plain quantization at the finest block that fits the same bytes
            for blk in (16, 32, 64, 128, 256):
                s2 = QuantSpec(spec.bits, blk, spec.symmetric, spec.algo, spec.grid)
                if quant_bytes(in_f, out_f, s2) <= total:
                    plain = DenseLinear(W, layer.bias)
                    plain.quantize_factors_(s2, gram=G)
                    candidates.append((output_err(W, plain.weight, L), quant_bytes(in_f, out_f, s2), plain,
                                       {"plain_block": blk}))
                    break
            err, nbytes, new, info = min(candidates, key=lambda c: c[0])
            ref = output_err(W, torch.zeros_like(W), L)
            if isinstance(new, DenseLinear):
                chose_plain += 1
            records.append(replace_layer(model, name, new.to(layer.weight.device),
                                         {"output_rel_error": err / ref if ref else 0.0, **info}))
        notes.append(f"residual {spec.tag}, correction {'w8' if lr_spec else 'fp32'}; "
                     f"{chose_plain}/{len(targets)} layers measured better as plain quantization at equal bytes")
        return CompressResult(records, notes=notes)
