"""`auto`: per-layer choice of form (dense, quantized, low-rank, quant-lowrank) within one byte budget.

`--budget B`: the targeted layers' stored bytes as a fraction of their fp32 bytes. For every targeted
layer each candidate form (`--forms`) is built the way the build stores it and scored by its relative
squared calibration OUTPUT error ||(W - W_hat) L||^2 / ||W L||^2 (L L^T = X^T X, as budget.py's measured
allocation), next to its exact stored bytes (the layer's own `stored_bytes`). budget.allocate_choices then
solves the multiple-choice knapsack (Lagrangian + greedy fill) and the chosen form replaces the layer.

Forms (tokens of `--forms`; dense fp32 is always a candidate):
* `w8`, `w4`, `w2`: DenseLinear with block-quantized weights (the build's quantizer and --quant-* grid);
* `lr32`, `lr8`, `lr4`: whitened-SVD low rank (one SVD per layer serves every rank; fp32 errors from
  the singular values), factors stored at 32, 8 or 4 bits, the QUANTIZED factors' error measured;
* `qlr4`, `qlr2`: quant-lowrank, W ~ Q_b(W - BA) + BA with an 8-bit correction of a few ranks.
2:4 sparsity is not offered: its quantized form stores dense codes (the bytes of `w8` at a larger
error) and fp32 2:4 stores ~0.53 of the fp32 bytes at a larger error than `w8` at 0.28.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UserError
from ...progress import track
from ..base import CompressContext, CompressResult, Method, MethodOption, register, replace_layer
from ..budget import allocate_choices, max_useful_rank
from ..layers import DenseLinear, FactorizedLinear, LowRankLinear, QuantLowRankLinear, balance_factors
from ..linalg import Factors, gram_factor, whitened_svd
from ..quant import QuantizedMatrix, QuantSpec, quant_bytes
from .quant_lowrank import fit_layer, lowrank_bytes, output_err, rank_for

FORMS = ("w8", "w4", "w2", "lr32", "lr8", "lr4", "qlr4", "qlr2")
DEFAULT_FORMS = "w8,w4,lr32,lr8,lr4,qlr4,qlr2"
QLR_FRACS = {4: (0.01, 0.03), 2: (0.03,)}  # correction bytes (fraction of fp32) per residual width

BUDGET = MethodOption("budget", float, 0.25, "stored bytes of the targeted layers as a fraction of their fp32 bytes",
                      min=0.0, max=1.0, min_open=True)
FORMS_OPT = MethodOption("forms", str, DEFAULT_FORMS,
                         f"candidate forms per layer, comma-separated from {', '.join(FORMS)} (dense fp32 always)")
RANK_STEPS = MethodOption("rank-steps", int, 2, "low-rank candidate ranks per octave (2: 1, 2, 3, 4, 6, 8, 11, 16, ...)",
                          min=1, max=8)
QLR_ROUNDS = MethodOption("correction-rounds", int, 2, "quant-lowrank alternations per candidate", min=1, max=16)


@dataclass(frozen=True)
class Form:
    """One candidate: family (dense | quant | lowrank | qlr), storage bits, rank; bytes from the shape alone."""

    family: str
    bits: int = 32
    rank: int = 0

    @property
    def tag(self) -> str:
        return {"dense": "dense fp32", "quant": f"w{self.bits}", "lowrank": f"lowrank r{self.rank} w{self.bits}",
                "qlr": f"quant-lowrank w{self.bits} + r{self.rank} w8"}[self.family]


def parse_forms(text: str) -> tuple[str, ...]:
    toks = tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in toks if t not in FORMS]
    if bad or not toks:
        raise UserError(f"--forms {text!r}: unknown form(s) {', '.join(bad) or '(none given)'}",
                        f"use a comma-separated list of {', '.join(FORMS)}")
    return toks


def candidate_ranks(out_f: int, in_f: int, steps: int) -> list[int]:
    """1, then `steps` ranks per octave up to the largest rank whose fp32 factors are smaller than dense."""
    top = max_useful_rank(out_f, in_f)
    rs = {max(1, round(2 ** (k / steps))) for k in range(0, steps * max(1, math.ceil(math.log2(max(top, 1)))) + 1)}
    return sorted(r for r in rs if r <= top)


def layer_forms(out_f: int, in_f: int, forms: tuple[str, ...], spec: QuantSpec, steps: int) -> list[Form]:
    """Every candidate form of one (out x in) layer."""
    out = [Form("dense")]
    for t in forms:
        if t[0] == "w":
            out.append(Form("quant", int(t[1:])))
        elif t.startswith("lr"):
            out += [Form("lowrank", int(t[2:]), r) for r in candidate_ranks(out_f, in_f, steps)]
        else:
            lr = _spec(spec, 8)
            bits = int(t[3:])
            ranks = sorted({max(1, rank_for(out_f, in_f, f, lr)) for f in QLR_FRACS[bits]})
            out += [Form("qlr", bits, r) for r in ranks if r <= min(out_f, in_f)]
    return out


def _spec(base: QuantSpec, bits: int) -> QuantSpec:
    return QuantSpec(bits, base.block, base.symmetric, base.algo, base.grid)


def form_bytes(f: Form, out_f: int, in_f: int, spec: QuantSpec, elem: int = 4) -> int:
    """Stored bytes of form `f`: the same formulas the layers' `stored_bytes` use (tested equal)."""
    if f.family == "dense":
        return out_f * in_f * elem
    if f.family == "quant":
        return quant_bytes(in_f, out_f, _spec(spec, f.bits))
    if f.family == "lowrank":
        return lowrank_bytes(out_f, in_f, f.rank, None if f.bits == 32 else _spec(spec, f.bits))
    return quant_bytes(in_f, out_f, _spec(spec, f.bits)) + lowrank_bytes(out_f, in_f, f.rank, _spec(spec, 8))


class LayerFit:
    """One layer's weight, Gram, its factor L and (lazily) one whitened SVD serving every rank."""

    def __init__(self, W: torch.Tensor, G: torch.Tensor, bias: torch.Tensor | None, rmax: int) -> None:
        self.W, self.G, self.bias, self.rmax = W.detach().to(torch.float32), G, bias, rmax
        self.L = gram_factor(G)
        self.ref = output_err(self.W, torch.zeros_like(self.W), self.L) ** 2
        self._svd: Factors | None = None

    @property
    def svd(self) -> Factors:
        if self._svd is None:
            self._svd = whitened_svd(self.W, self.L, self.rmax)
        return self._svd

    def rel(self, W_hat: torch.Tensor) -> float:
        return output_err(self.W, W_hat, self.L) ** 2 / self.ref if self.ref else 0.0


def build(f: Form, fit: LayerFit, spec: QuantSpec, rounds: int) -> tuple[nn.Module, float]:
    """The layer form `f` stores, and its relative squared output error (of what is stored)."""
    W, bias = fit.W, fit.bias
    if f.family == "dense":
        return DenseLinear(W, bias), 0.0
    if f.family == "quant":
        layer = DenseLinear(W, bias)
        layer.quantize_factors_(_spec(spec, f.bits), gram=fit.G)
        return layer, fit.rel(layer.weight)
    if f.family == "qlr":
        lr = _spec(spec, 8)
        Q, A, B, errs = fit_layer(W, fit.G, _spec(spec, f.bits), f.rank, rounds, lr, fit.L)
        layer = QuantLowRankLinear(Q, A, B, bias)
        layer.pending_quant = {"A": lr, "B": lr}
        return layer, min(errs) ** 2 / fit.ref if fit.ref else 0.0
    s = fit.svd
    r = f.rank
    if f.bits == 32:
        dropped = torch.cat([s.kept[r:], s.dropped])
        tot = float((s.kept ** 2).sum() + (s.dropped ** 2).sum())
        layer = LowRankLinear(*balance_factors(s.A[:r], s.B[:, :r]), bias)
        return layer, float((dropped ** 2).sum()) / tot if tot else 0.0
    fs = _spec(spec, f.bits)
    A, B = balance_factors(s.A[:r], s.B[:, :r])
    layer = LowRankLinear(A, B, bias)
    layer.pending_quant = {"A": fs, "B": fs}  # stored after recovery, as quant-lowrank's correction
    Aq = QuantizedMatrix.from_weight(A, fs).weight() if QuantizedMatrix.saves_bytes(A, fs) else A
    Bq = QuantizedMatrix.from_weight(B, fs).weight() if QuantizedMatrix.saves_bytes(B, fs) else B
    return layer, fit.rel(Bq.to(torch.float64) @ Aq.to(torch.float64))


def quant_spec(ctx: CompressContext) -> QuantSpec:
    q = ctx.quant
    return QuantSpec(4, int(q.get("block", 32)), bool(q.get("symmetric", True)), str(q.get("algo", "rtn")),
                     str(q.get("grid", "signed")))


@register
class AutoMethod(Method):
    name = "auto"
    summary = "per-layer form (dense / w8 / w4 / low-rank at 32-8-4 bits / quant-lowrank) minimising calibration output error within --budget"
    needs_calibration = True
    blockwise = False  # one global allocation over every target
    options = (BUDGET, FORMS_OPT, RANK_STEPS, QLR_ROUNDS)

    def check_options(self, options: dict) -> None:
        parse_forms(options.get("forms", DEFAULT_FORMS))

    def plan_forms(self, shapes: dict[str, tuple[int, int]], options: dict, spec: QuantSpec, elem: dict[str, int]
                   ) -> dict[str, list[Form]]:
        forms = parse_forms(options.get("forms", DEFAULT_FORMS))
        if spec.grid == "positive":  # TensorRT's QDQ weights: 4 or 8 bits only
            forms = tuple(t for t in forms if not t.endswith("2") or t == "lr32")
        return {n: layer_forms(o, i, forms, spec, int(options.get("rank_steps", 2))) for n, (o, i) in shapes.items()}

    def check_reachable(self, shapes: dict[str, tuple[int, int]], plans: dict[str, list[Form]], budget: float,
                        spec: QuantSpec, elem: dict[str, int]) -> int:
        """Budget in bytes; UserError naming the smallest reachable --budget when the cheapest forms exceed it."""
        full = sum(o * i * elem[n] for n, (o, i) in shapes.items())
        least = sum(min(form_bytes(f, o, i, spec, elem[n]) for f in plans[n]) for n, (o, i) in shapes.items())
        cap = int(budget * full)
        if least > cap:
            need = math.ceil(least / full * 1e4) / 1e4
            raise UserError(f"--budget {budget} is below the smallest reachable budget {need} "
                            f"(every targeted layer in its cheapest form: {least:,} of {full:,} bytes)",
                            f"use --budget {need} or more, or add cheaper --forms")
        return cap

    def validate_model(self, model: nn.Module, targets: list[str], options: dict) -> None:
        """An unreachable --budget is refused from the targeted shapes alone, before calibration."""
        shapes, elem = _shapes(model, targets)
        spec = QuantSpec()
        self.check_reachable(shapes, self.plan_forms(shapes, options, spec, elem), float(options["budget"]), spec, elem)

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        calib = ctx.require_calibration()
        spec = quant_spec(ctx)
        shapes, elem = _shapes(model, targets)
        plans = self.plan_forms(shapes, ctx.options, spec, elem)
        cap = self.check_reachable(shapes, plans, float(ctx.opt("budget", 0.25)), spec, elem)
        rounds = int(ctx.opt("correction_rounds", 2))
        grams = calib.grams(model, targets)
        opts = {}
        for name in track(targets, "auto: candidate errors"):
            fit = self._fit(model, name, grams[name], ctx, plans[name])
            errs = [build(f, fit, spec, rounds)[1] for f in plans[name]]
            byts = [form_bytes(f, *shapes[name], spec, elem[name]) for f in plans[name]]
            opts[name] = (torch.tensor(errs, dtype=torch.float64), torch.tensor(byts, dtype=torch.float64))
        alloc = allocate_choices(opts, cap)
        records = []
        for name in track(targets, "auto: build chosen forms"):
            j = alloc.choice[name]
            f = plans[name][j]
            layer = model.get_submodule(name)
            if f.family == "dense":
                new = None
            else:
                new, _ = build(f, self._fit(model, name, grams[name], ctx, [f]), spec, rounds)
                new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
            records.append(replace_layer(model, name, new, {
                "form": f.tag, "family": f.family, "rank": f.rank, "bits": f.bits,
                "bytes": int(opts[name][1][j]), "predicted_output_rel_error": round(float(opts[name][0][j]), 8)}))
        counts: dict[str, int] = {}
        for r in records:
            key = r.metrics["form"].split(" r")[0] if r.metrics["family"] == "lowrank" else r.metrics["form"].split(" +")[0]
            counts[key] = counts.get(key, 0) + 1
        notes = [f"auto: budget {ctx.opt('budget')} of the fp32 bytes = {cap:,} bytes, chosen {alloc.bytes_after:,} bytes; "
                 f"summed predicted relative output error {alloc.error:.4g}; forms: "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) + "; --ratio is not used"]
        return CompressResult(records, notes=notes, extra={"budget_bytes": cap, "chosen_bytes": alloc.bytes_after,
                                                           "predicted_error": alloc.error, "lambda": alloc.lam,
                                                           "forms": counts})

    @staticmethod
    def _fit(model: nn.Module, name: str, G: torch.Tensor, ctx: CompressContext, forms: list[Form]) -> LayerFit:
        layer = model.get_submodule(name)
        rmax = max([f.rank for f in forms if f.family == "lowrank"], default=1)
        return LayerFit(layer.weight.detach().to(ctx.device), G.to(ctx.device), layer.bias, rmax)


def _shapes(model: nn.Module, targets: list[str]) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    mods = {n: model.get_submodule(n) for n in targets}
    shapes = {n: tuple(m.weight.shape) for n, m in mods.items()}
    elem = {n: (4 if isinstance(m, FactorizedLinear) else m.weight.element_size()) for n, m in mods.items()}
    return shapes, elem
