"""`auto`: per-layer choice of form (dense, quantized, low-rank, quant-lowrank) within one byte budget.

`--budget B`: the targeted layers' stored bytes as a fraction of their fp32 bytes. For every targeted
layer each candidate form (`--forms`) is built the way the build stores it and scored by its calibration
OUTPUT error (L L^T = X^T X, as budget.py's measured allocation), weighed per output feature by the task
loss's squared gradient (`--weighting fisher`: a predicted loss increase, so layers the loss feels more
get the bytes) or relative per layer (`relative`), next to its exact stored bytes (the layer's own
`stored_bytes`). budget.allocate_choices solves the multiple-choice knapsack (Lagrangian + greedy fill)
over every form and over the quantized families alone; a held-out check (compress/selection.py) keeps
the plan with the lowest task loss, and the chosen forms replace the layers. `--min-quality` searches
the budget for the smallest plan meeting a held-out quality bar.

Forms (tokens of `--forms`; dense fp32 is always a candidate):
* `w8`, `w4`, `w2` (optionally `g<block>`, e.g. `w4g128`): DenseLinear with block-quantized weights
  (the build's quantizer and --quant-* grid);
* `lr32`, `lr8`, `lr4`: whitened-SVD low rank (one SVD per layer serves every rank; fp32 errors from
  the singular values), factors stored at 32, 8 or 4 bits, the QUANTIZED factors' error measured;
* `qlr4`, `qlr2`: quant-lowrank, W ~ Q_b(W - BA) + BA with an 8-bit correction of a few ranks.
2:4 sparsity is not offered: its quantized form stores dense codes (the bytes of `w8` at a larger
error) and fp32 2:4 stores ~0.53 of the fp32 bytes at a larger error than `w8` at 0.28.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...errors import UserError
from ...progress import log, track
from ..base import CompressContext, CompressResult, Method, MethodOption, register, replace_layer
from ..budget import ChoiceAllocation, allocate_choices, allocate_choices_within, max_useful_rank
from ..latency import Kernel, LatencyModel, factor_kernel, latency_model
from ..layers import DenseLinear, FactorizedLinear, LowRankLinear, QuantLowRankLinear, balance_factors
from ..linalg import Factors, gram_factor, whitened_svd
from ..quant import QuantizedMatrix, QuantSpec, quant_bytes
from ..selection import SelectionCheck
from ..targets import get_module, set_module
from .quant_lowrank import fit_layer, lowrank_bytes, output_err, rank_for

FORMS = ("w8", "w4", "w2", "lr32", "lr8", "lr4", "qlr4", "qlr2")  # w<bits> also takes g<block>: w4g128
DEFAULT_FORMS = "w8,w8g128,w4,w4g128,w2,lr32,lr8,lr4,qlr4,qlr2"
_QUANT_TOKEN = re.compile(r"^w(8|4|2)(?:g(16|32|64|128|256))?$")
QLR_FRACS = {4: (0.01, 0.03), 2: (0.01, 0.03)}  # correction bytes (fraction of fp32) per residual width

BUDGET = MethodOption("budget", float, 0.25, "stored bytes of the targeted layers as a fraction of their fp32 bytes",
                      min=0.0, max=1.0, min_open=True)
FORMS_OPT = MethodOption("forms", str, DEFAULT_FORMS,
                         f"candidate forms per layer, comma-separated from {', '.join(FORMS)} (dense fp32 always)")
RANK_STEPS = MethodOption("rank-steps", int, 2, "low-rank candidate ranks per octave (2: 1, 2, 3, 4, 6, 8, 11, 16, ...)",
                          min=1, max=8)
QLR_ROUNDS = MethodOption("correction-rounds", int, 2, "quant-lowrank alternations per candidate", min=1, max=16)
WEIGHTING = MethodOption("weighting", str, "fisher",
                         "how layer errors add up: fisher = output error weighted by the task loss's squared gradient "
                         "per output feature (predicted loss increase), relative = each layer's relative output error",
                         choices=("fisher", "relative"))
SELECT = MethodOption("select-windows", int, 8,
                      "held-out windows (the pydoc selection split) on which the allocation over every form is "
                      "scored against the quantized-only plans at the same budget, the best kept; 0 = no check",
                      min=0, max=256)
MIN_QUALITY = MethodOption("min-quality", float, 0.0,
                           "the smallest plan (searched up to --budget, the most bytes allowed) whose quality on the "
                           "held-out selection split meets this: encoders the least mean embedding cosine to the "
                           "original (e.g. 0.98), decoders the largest perplexity ratio (e.g. 1.1); 0 = off",
                           min=0.0, max=100.0)
BUDGET_LATENCY = MethodOption("budget-latency", float, 0.0,
                              "the targeted layers' batch-1 decode latency on ONNX Runtime's CPU kernels (measured per "
                              "kernel on this machine, compress/latency.py) as a fraction of theirs in fp32; applies "
                              "together with --budget (give --budget 1 for latency alone); 0 = off",
                              min=0.0, max=1.0)
LATENCY_THREADS = MethodOption("latency-threads", int, 1, "threads the --budget-latency kernels are timed with "
                               "(the decode's intra-op threads)", min=1, max=256)
SEARCH_STEPS = 5  # --min-quality: bisection steps over the budget (resolution 1/32 of the searched range)
SENS_DAMP = 1e-3  # row weights + this x their mean: no output feature is free, B/sqrt(w) stays finite


@dataclass(frozen=True)
class Form:
    """One candidate: family (dense | quant | lowrank | qlr), storage bits, rank; bytes from the shape alone."""

    family: str
    bits: int = 32
    rank: int = 0
    block: int = 0  # quant family: block length along K (0 = the build's --quant-block)

    @property
    def tag(self) -> str:
        return {"dense": "dense fp32", "quant": f"w{self.bits}" + (f" g{self.block}" if self.block else ""), "lowrank": f"lowrank r{self.rank} w{self.bits}",
                "qlr": f"quant-lowrank w{self.bits} + r{self.rank} w8"}[self.family]


def parse_forms(text: str) -> tuple[str, ...]:
    toks = tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in toks if t not in FORMS and not _QUANT_TOKEN.match(t)]
    if bad or not toks:
        raise UserError(f"--forms {text!r}: unknown form(s) {', '.join(bad) or '(none given)'}",
                        f"use a comma-separated list of {', '.join(FORMS)} (w8/w4/w2 with an optional block, e.g. w4g128)")
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
            m = _QUANT_TOKEN.match(t)
            out.append(Form("quant", int(m.group(1)), block=int(m.group(2) or 0)))
        elif t.startswith("lr"):
            out += [Form("lowrank", int(t[2:]), r) for r in candidate_ranks(out_f, in_f, steps)]
        else:
            lr = _spec(spec, 8)
            bits = int(t[3:])
            ranks = sorted({max(1, rank_for(out_f, in_f, f, lr)) for f in QLR_FRACS[bits]})
            out += [Form("qlr", bits, r) for r in ranks if r <= min(out_f, in_f)]
    return out


def _spec(base: QuantSpec, bits: int, block: int = 0) -> QuantSpec:
    return QuantSpec(bits, block or base.block, base.symmetric, base.algo, base.grid)


def form_bytes(f: Form, out_f: int, in_f: int, spec: QuantSpec, elem: int = 4) -> int:
    """Stored bytes of form `f`: the same formulas the layers' `stored_bytes` use (tested equal)."""
    if f.family == "dense":
        return out_f * in_f * elem
    if f.family == "quant":
        return quant_bytes(in_f, out_f, _spec(spec, f.bits, f.block))
    if f.family == "lowrank":
        return lowrank_bytes(out_f, in_f, f.rank, None if f.bits == 32 else _spec(spec, f.bits))
    return quant_bytes(in_f, out_f, _spec(spec, f.bits)) + lowrank_bytes(out_f, in_f, f.rank, _spec(spec, 8))


def form_nodes(f: Form, out_f: int, in_f: int, spec: QuantSpec) -> list[tuple[int, int, QuantSpec | None]]:
    """(K, N, storage spec or None for fp32) of every MatMul node form `f` exports, one per stored factor."""
    if f.family == "dense":
        return [(in_f, out_f, None)]
    if f.family == "quant":
        return [(in_f, out_f, _spec(spec, f.bits, f.block))]
    lr = None if f.family == "lowrank" and f.bits == 32 else _spec(spec, 8 if f.family == "qlr" else f.bits)
    nodes = [(in_f, f.rank, lr), (f.rank, out_f, lr)]
    return nodes + ([(in_f, out_f, _spec(spec, f.bits))] if f.family == "qlr" else [])


def form_kernels(f: Form, out_f: int, in_f: int, spec: QuantSpec) -> set[Kernel]:
    """Kernel kinds form `f` runs as (a factor that would not save bytes stays fp32, as layers.py stores it)."""
    return {factor_kernel(K, N, s) for K, N, s in form_nodes(f, out_f, in_f, spec)}


def form_latency(f: Form, out_f: int, in_f: int, spec: QuantSpec, lm: LatencyModel) -> float:
    """Predicted batch-1 microseconds of the nodes form `f` exports (quant-lowrank's sum costs one more
    node's overhead)."""
    us = sum(lm.factor_us(K, N, s) for K, N, s in form_nodes(f, out_f, in_f, spec))
    return us + (lm.coef[Kernel().key][0] if f.family == "qlr" else 0.0)


class LayerFit:
    """One layer's weight, Gram, its factor L and (lazily) one whitened SVD serving every rank.

    `row_weight` (the loss's mean squared gradient per output feature, fisher.output_sensitivity):
    candidates are scored by the predicted loss increase 0.5 * sum_j w_j ||((W - W_hat) L)_j||^2, and
    the low-rank candidates are fitted in that metric (SVD of diag(sqrt w) W L); None: relative
    output error ||(W - W_hat) L||^2 / ||W L||^2, every layer weighed alike.
    """

    def __init__(self, W: torch.Tensor, G: torch.Tensor, bias: torch.Tensor | None, rmax: int,
                 row_weight: torch.Tensor | None = None) -> None:
        self.W, self.G, self.bias, self.rmax = W.detach().to(torch.float32), G, bias, rmax
        self.L = gram_factor(G)
        self.ref = output_err(self.W, torch.zeros_like(self.W), self.L) ** 2
        self.d = None if row_weight is None else row_weight.to(torch.float64).sqrt().to(self.L.device)
        self._svd: Factors | None = None

    @property
    def svd(self) -> Factors:
        if self._svd is None:
            if self.d is None:
                self._svd = whitened_svd(self.W, self.L, self.rmax)
            else:  # min ||D (W - BA) L||: whitened SVD of D W, rows of B divided back
                f = whitened_svd(self.d[:, None].to(self.W.dtype) * self.W, self.L, self.rmax)
                self._svd = Factors(f.A, (f.B.to(torch.float64) / self.d[:, None]).to(f.B.dtype), f.kept, f.dropped)
        return self._svd

    def rel(self, W_hat: torch.Tensor) -> float:
        return output_err(self.W, W_hat, self.L) ** 2 / self.ref if self.ref else 0.0

    def score(self, W_hat: torch.Tensor) -> float:
        """What the allocation sums: predicted loss increase (row_weight given) or relative output error."""
        if self.d is None:
            return self.rel(W_hat)
        E = self.d[:, None] * (self.W.to(torch.float64) - W_hat.to(torch.float64))
        return 0.5 * float((E @ self.L).norm()) ** 2

    def tail_score(self, r: int) -> float:
        """score of the fp32 rank-r fit, exactly, from the dropped singular values."""
        s = self.svd
        dropped = float((s.kept[r:] ** 2).sum() + (s.dropped ** 2).sum())
        if self.d is not None:
            return 0.5 * dropped
        tot = float((s.kept ** 2).sum() + (s.dropped ** 2).sum())
        return dropped / tot if tot else 0.0


def build(f: Form, fit: LayerFit, spec: QuantSpec, rounds: int) -> tuple[nn.Module, float]:
    """The layer form `f` stores, and its relative squared output error (of what is stored)."""
    W, bias = fit.W, fit.bias
    if f.family == "dense":
        return DenseLinear(W, bias), 0.0
    if f.family == "quant":
        layer = DenseLinear(W, bias)
        layer.quantize_factors_(_spec(spec, f.bits, f.block), gram=fit.G)
        return layer, fit.score(layer.weight)
    if f.family == "qlr":
        lr = _spec(spec, 8)
        Q, A, B, errs = fit_layer(W, fit.G, _spec(spec, f.bits), f.rank, rounds, lr, fit.L)
        layer = QuantLowRankLinear(Q, A, B, bias)
        layer.pending_quant = {"A": lr, "B": lr}
        if fit.d is not None:
            return layer, fit.score(layer.dense_weight().detach())
        return layer, min(errs) ** 2 / fit.ref if fit.ref else 0.0
    s = fit.svd
    r = f.rank
    if f.bits == 32:
        layer = LowRankLinear(*balance_factors(s.A[:r], s.B[:, :r]), bias)
        return layer, fit.tail_score(r)
    fs = _spec(spec, f.bits)
    A, B = balance_factors(s.A[:r], s.B[:, :r])
    layer = LowRankLinear(A, B, bias)
    layer.pending_quant = {"A": fs, "B": fs}  # stored after recovery, as quant-lowrank's correction
    Aq = QuantizedMatrix.from_weight(A, fs).weight() if QuantizedMatrix.saves_bytes(A, fs) else A
    Bq = QuantizedMatrix.from_weight(B, fs).weight() if QuantizedMatrix.saves_bytes(B, fs) else B
    return layer, fit.score(Bq.to(torch.float64) @ Aq.to(torch.float64))


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
    options = (BUDGET, FORMS_OPT, RANK_STEPS, QLR_ROUNDS, WEIGHTING, SELECT, MIN_QUALITY, BUDGET_LATENCY, LATENCY_THREADS)

    def check_options(self, options: dict) -> None:
        parse_forms(options.get("forms", DEFAULT_FORMS))

    def plan_forms(self, shapes: dict[str, tuple[int, int]], options: dict, spec: QuantSpec, elem: dict[str, int]
                   ) -> dict[str, list[Form]]:
        forms = parse_forms(options.get("forms", DEFAULT_FORMS))
        if spec.grid == "positive":  # TensorRT's QDQ weights: 4 or 8 bits only
            forms = tuple(t for t in forms if t in ("lr32", "lr8", "lr4", "qlr4")
                          or (_QUANT_TOKEN.match(t) and _QUANT_TOKEN.match(t).group(1) != "2"))
        return {n: layer_forms(o, i, forms, spec, int(options.get("rank_steps", 2))) for n, (o, i) in shapes.items()}

    def check_reachable(self, shapes: dict[str, tuple[int, int]], plans: dict[str, list[Form]], budget: float,
                        spec: QuantSpec, elem: dict[str, int]) -> int:
        """Budget in bytes; UserError naming the smallest reachable --budget when the cheapest forms exceed it."""
        full, least = full_bytes(shapes, elem), check_least(shapes, plans, spec, elem)
        cap = int(budget * full)
        if least > cap:
            need = math.ceil(least / full * 1e4) / 1e4
            raise UserError(f"--budget {budget} is below the smallest reachable budget {need} "
                            f"(every targeted layer in its cheapest form: {least:,} of {full:,} bytes)",
                            f"use --budget {need} or more, or add cheaper --forms")
        return cap

    def latencies(self, shapes: dict[str, tuple[int, int]], plans: dict[str, list[Form]], options: dict,
                  spec: QuantSpec) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """--budget-latency: (predicted us of every candidate per layer, the cap in us, the fp32 us), or
        None when off. UserError naming the smallest reachable fraction when even the fastest forms exceed it."""
        frac = float(options.get("budget_latency") or 0.0)
        if not frac:
            return None
        if spec.grid == "positive":
            raise UserError("--budget-latency is measured on ONNX Runtime's CPU kernels, not TensorRT's",
                            "build with --backend ort, or use --budget (bytes) for a TensorRT engine")
        kernels = set().union(*(form_kernels(f, o, i, spec) for n, (o, i) in shapes.items() for f in plans[n]))
        lm = latency_model(kernels, int(options.get("latency_threads") or 1),
                           on_measure=lambda k: log(f"auto: timing kernel {k.key} (once per machine, cached)"))
        lats = {n: torch.tensor([form_latency(f, o, i, spec, lm) for f in plans[n]], dtype=torch.float64)
                for n, (o, i) in shapes.items()}
        fp32 = sum(lm.us(Kernel(), i, o) for o, i in shapes.values())
        least = sum(float(v.min()) for v in lats.values())
        if least > frac * fp32:
            need = math.ceil(least / fp32 * 1e4) / 1e4
            raise UserError(f"--budget-latency {frac} is below the fastest reachable {need} (every targeted layer in its "
                            f"fastest form: {least:,.0f} of {fp32:,.0f} us per token, measured kernels)",
                            f"use --budget-latency {need} or more")
        return lats, frac * fp32, fp32

    def validate_model(self, model: nn.Module, targets: list[str], options: dict) -> None:
        """An unreachable --budget (or --budget-latency) is refused from the targeted shapes alone, before calibration."""
        shapes, elem = _shapes(model, targets)
        spec = QuantSpec()
        plans = self.plan_forms(shapes, options, spec, elem)
        self.check_reachable(shapes, plans, float(options["budget"]), spec, elem)
        self.latencies(shapes, plans, options, spec)

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        calib = ctx.require_calibration()
        spec = quant_spec(ctx)
        shapes, elem = _shapes(model, targets)
        plans = self.plan_forms(shapes, ctx.options, spec, elem)
        cap = self.check_reachable(shapes, plans, float(ctx.opt("budget", 0.25)), spec, elem)
        timing = self.latencies(shapes, plans, ctx.options, spec)
        lats, lat_cap, fp32_us = timing or (None, None, None)
        rounds = int(ctx.opt("correction_rounds", 2))
        minq = float(ctx.opt("min_quality", 0.0) or 0.0)
        bar = QualityBar.for_kind(calib.loaded.kind, minq) if minq else None
        grams = calib.grams(model, targets)
        originals = {t: get_module(model, t) for t in targets}  # the layers as given (the held-out check swaps them)
        weights = self._row_weights(model, targets, calib, ctx)
        opts = {}
        for name in track(targets, "auto: candidate errors"):
            fit = self._fit(originals[name], grams[name], ctx, plans[name], weights.get(name))
            errs = [build(f, fit, spec, rounds)[1] for f in plans[name]]
            byts = [form_bytes(f, *shapes[name], spec, elem[name]) for f in plans[name]]
            opts[name] = (torch.tensor(errs, dtype=torch.float64), torch.tensor(byts, dtype=torch.float64))
        alts = alternatives(opts, plans, cap, lats, lat_cap)
        if not alts:
            raise UserError(f"no plan meets --budget {ctx.opt('budget')} and --budget-latency {ctx.opt('budget_latency')} "
                            "together (the forms that fit the bytes are too slow)",
                            "raise --budget or --budget-latency")
        built: dict[tuple[str, int], nn.Module | None] = {}
        rels: dict[tuple[str, int], float] = {}

        def layer_for(name: str, j: int) -> nn.Module | None:
            if (name, j) not in built:
                f, layer = plans[name][j], originals[name]
                new, rel = None, 0.0
                if f.family != "dense":
                    fit = self._fit(layer, grams[name], ctx, [f], weights.get(name))
                    new, _ = build(f, fit, spec, rounds)
                    rel = fit.rel(new.dense_weight().detach())
                    new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
                built[(name, j)], rels[(name, j)] = new, rel
            return built[(name, j)]

        n = max(int(ctx.opt("select_windows", 8)), 8 if bar else 0)
        check = SelectionCheck(calib.loaded, model, n, calib.config.length, ctx.seed, device=ctx.device) if n else None
        if bar is None:
            label, held_out = self._select(model, originals, alts, layer_for, check)
        else:
            alts, label, held_out = self._smallest_meeting(bar, model, originals, opts, plans, layer_for, built,
                                                           check, cap, check_least(shapes, plans, spec, elem), lats, lat_cap)
        alloc = alts[label]
        records = []
        for name in track(targets, "auto: build chosen forms"):
            j = alloc.choice[name]
            f = plans[name][j]
            new = layer_for(name, j)
            records.append(replace_layer(model, name, new, {
                "form": f.tag, "family": f.family, "rank": f.rank, "bits": f.bits,
                **({"block": f.block or spec.block} if f.family == "quant" else {}),
                "bytes": int(opts[name][1][j]), "predicted_output_rel_error": round(rels[(name, j)], 8),
                **({"predicted_loss_increase": float(f"{float(opts[name][0][j]):.6g}")} if weights else {}),
                **({"predicted_us": round(float(lats[name][j]), 2)} if lats else {})}))
        built.clear()
        counts: dict[str, int] = {}
        for r in records:
            key = r.metrics["form"].split(" r")[0] if r.metrics["family"] == "lowrank" else r.metrics["form"].split(" +")[0]
            counts[key] = counts.get(key, 0) + 1
        what = "predicted loss increase (output error x squared loss gradient)" if weights else "relative output error"
        notes = [f"auto: budget {ctx.opt('budget')} of the fp32 bytes = {cap:,} bytes, chosen {alloc.bytes_after:,} bytes; "
                 f"summed {what} {alloc.error:.4g}; forms: "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) + "; --ratio is not used"]
        chosen_us = None if lats is None else sum(float(lats[n][j]) for n, j in alloc.choice.items())
        if lats is not None:
            notes.append(f"auto: --budget-latency {ctx.opt('budget_latency')}: the chosen kernels' predicted batch-1 "
                         f"latency {chosen_us:,.0f} us per token ({chosen_us / fp32_us:.4f} of fp32 {fp32_us:,.0f} us; "
                         f"cap {lat_cap:,.0f} us; {ctx.opt('latency_threads')} thread(s), measured kernels)"
                         + uniform_note(plans, lats, fp32_us, spec))
        if held_out:
            notes.append("auto: held-out check (pydoc selection split, task loss; lower is better): "
                         + ", ".join(f"{k} {v['loss']:.5g} ({check.metric} {v['quality']:.4f}, {v['bytes']:,} bytes)"
                                   for k, v in held_out.items())
                         + f"; kept {label}")
        if bar is not None:
            q = held_out[label]["quality"]
            notes.append(f"auto: --min-quality {bar.target:g}: the smallest plan found whose held-out {bar.metric} "
                         f"meets it: {q:.4f} at {alloc.bytes_after:,} bytes ({alloc.bytes_after / full_bytes(shapes, elem):.4f} "
                         f"of the fp32 bytes; bisection over the budget, {SEARCH_STEPS} steps)")
        extra_lat = {} if lats is None else {"budget_us": round(lat_cap, 1), "fp32_us": round(fp32_us, 1),
                                             "chosen_us": round(chosen_us, 1)}
        return CompressResult(records, notes=notes, extra={**extra_lat, "budget_bytes": cap, "chosen_bytes": alloc.bytes_after,
                                                           "predicted_error": alloc.error, "lambda": alloc.lam,
                                                           "forms": counts, "plan": label, "held_out": held_out})

    @staticmethod
    def _select(model: nn.Module, originals: dict[str, nn.Module], alts: dict[str, ChoiceAllocation], layer_for,
                check: SelectionCheck | None, always: bool = False) -> tuple[str, dict]:
        """The plan (of `alternatives`) with the lowest task loss on held-out selection windows."""
        if check is None or (len(alts) == 1 and not always):
            return next(iter(alts)), {}
        targets, scores = list(originals), {}
        try:
            for label, a in alts.items():
                for t in track(targets, f"auto: held-out check of '{label}'"):
                    new = layer_for(t, a.choice[t])
                    set_module(model, t, originals[t] if new is None else new)
                loss = check.loss(model)
                scores[label] = {"loss": loss, "quality": round(check.quality(loss), 6), "bytes": a.bytes_after,
                                 "predicted_error": float(f"{a.error:.6g}")}
        finally:
            for t in targets:
                set_module(model, t, originals[t])
        return min(scores, key=lambda k: scores[k]["loss"]), scores

    def _smallest_meeting(self, bar: "QualityBar", model: nn.Module, originals: dict[str, nn.Module], opts: dict,
                          plans: dict[str, list[Form]], layer_for, built: dict, check: SelectionCheck, cap: int,
                          least: int, lats: dict | None = None,
                          lat_cap: float | None = None) -> tuple[dict[str, ChoiceAllocation], str, dict]:
        """--min-quality: bisect the byte budget between the cheapest forms and --budget for the smallest
        plan whose held-out quality meets the bar; a UserError naming the best reached when even --budget fails."""

        def at(c: int) -> tuple[dict, str, dict]:
            alts = alternatives(opts, plans, c, lats, lat_cap)
            if not alts:
                raise UserError(f"--min-quality: no plan of {c:,} bytes meets --budget-latency", "raise --budget-latency")
            label, held = self._select(model, originals, alts, layer_for, check, always=True)
            return alts, label, held

        best = at(cap)
        q = best[2][best[1]]["quality"]
        if not bar.met(q):
            raise UserError(f"--min-quality {bar.target:g} is not reached within --budget: the best held-out {bar.metric} "
                            f"is {q:.4f} at {best[0][best[1]].bytes_after:,} bytes",
                            f"raise --budget (now {cap:,} bytes) or lower --min-quality to {q:.4f}")
        lo, hi = least, best[0][best[1]].bytes_after
        for _ in range(SEARCH_STEPS):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            trial = at(mid)
            if bar.met(trial[2][trial[1]]["quality"]):
                best, hi = trial, trial[0][trial[1]].bytes_after
            else:
                lo = mid
            keep = best[0][best[1]].choice  # bounded memory: only the best plan's layers stay built
            for key in [k for k in built if keep.get(k[0]) != k[1]]:
                del built[key]
        return best

    @staticmethod
    def _row_weights(model: nn.Module, targets: list[str], calib, ctx: CompressContext) -> dict[str, torch.Tensor]:
        """Per-output-feature loss sensitivity of every target (empty with --weighting relative)."""
        if ctx.opt("weighting", "fisher") != "fisher":
            return {}
        from ..fisher import output_sensitivity
        from ..objective import TaskObjective

        g2 = output_sensitivity(model, targets, calib, TaskObjective(calib, model), seed=ctx.seed)
        return {n: v + SENS_DAMP * float(v.mean()) for n, v in g2.items()}

    @staticmethod
    def _fit(layer: nn.Module, G: torch.Tensor, ctx: CompressContext, forms: list[Form],
             row_weight: torch.Tensor | None = None) -> LayerFit:
        rmax = max([f.rank for f in forms if f.family == "lowrank"], default=1)
        return LayerFit(layer.weight.detach().to(ctx.device), G.to(ctx.device), layer.bias, rmax, row_weight)


@dataclass(frozen=True)
class QualityBar:
    """--min-quality for the model's kind: encoders at least this cosine, decoders at most this perplexity ratio."""

    target: float
    metric: str
    higher_is_better: bool

    @staticmethod
    def for_kind(kind: str, target: float) -> "QualityBar":
        if kind == "encoder":
            if not 0 < target <= 1:
                raise UserError(f"--min-quality {target:g} is not a cosine",
                                "encoders take the least mean embedding cosine to the original, e.g. --min-quality 0.98")
            return QualityBar(target, "mean embedding cosine", True)
        if target < 1:
            raise UserError(f"--min-quality {target:g} is not a perplexity ratio",
                            "decoders take the largest perplexity ratio to the original (>= 1), e.g. --min-quality 1.1")
        return QualityBar(target, "perplexity ratio", False)

    def met(self, quality: float) -> bool:
        return quality >= self.target if self.higher_is_better else quality <= self.target


def full_bytes(shapes: dict[str, tuple[int, int]], elem: dict[str, int]) -> int:
    return sum(o * i * elem[n] for n, (o, i) in shapes.items())


def check_least(shapes: dict[str, tuple[int, int]], plans: dict[str, list[Form]], spec: QuantSpec, elem: dict[str, int]) -> int:
    """Bytes of every targeted layer in its cheapest form: the smallest reachable budget."""
    return sum(min(form_bytes(f, o, i, spec, elem[n]) for f in plans[n]) for n, (o, i) in shapes.items())


PLAN_FAMILIES = (("all forms", None), ("quantized forms", ("dense", "quant", "qlr")), ("dense quantized", ("dense", "quant")))


def uniform_note(plans: dict[str, list[Form]], lats: dict[str, torch.Tensor], fp32: float, spec: QuantSpec) -> str:
    """What w4 at the build's block on every layer would predict (the fraction ORT's own w4 compares with)."""
    idx = {n: [j for j, f in enumerate(fs) if f.family == "quant" and f.bits == 4 and f.block in (0, spec.block)]
           for n, fs in plans.items()}
    if not all(idx.values()):
        return ""
    return f"; w4 block {spec.block} everywhere would be {sum(float(lats[n][j[0]]) for n, j in idx.items()) / fp32:.4f}"


def alternatives(opts: dict, plans: dict[str, list[Form]], cap: int, lats: dict[str, torch.Tensor] | None = None,
                 lat_cap: float | None = None) -> dict[str, ChoiceAllocation]:
    """The allocation over every form, and over the quantized families alone (where reachable and different);
    with `lats` (predicted us per candidate) each plan also keeps the summed latency within `lat_cap`.

    Summed per-layer predictions are exact for none of them: quantization noise adds up roughly as
    predicted, while truncation errors of many low-rank layers compound and move out of the calibration
    domain, so the held-out check (`AutoMethod._select`) decides between the plans."""
    out: dict[str, ChoiceAllocation] = {}
    for label, fams in PLAN_FAMILIES:
        keep = {n: [j for j, f in enumerate(plans[n]) if fams is None or f.family in fams] for n in opts}
        if sum(float(opts[n][1][keep[n]].min()) for n in opts) > cap:
            continue
        sub = {n: (opts[n][0][keep[n]], opts[n][1][keep[n]]) for n in opts}
        if lats is None:
            a = allocate_choices(sub, cap)
        else:
            if sum(float(lats[n][keep[n]].min()) for n in opts) > lat_cap:
                continue
            a = allocate_choices_within(sub, cap, {n: lats[n][keep[n]] for n in opts}, lat_cap)
            if a is None:
                continue
        a = replace(a, choice={n: keep[n][j] for n, j in a.choice.items()})
        if all(a.choice != b.choice for b in out.values()):
            out[label] = a
    return out


def _shapes(model: nn.Module, targets: list[str]) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    mods = {n: model.get_submodule(n) for n in targets}
    shapes = {n: tuple(m.weight.shape) for n, m in mods.items()}
    elem = {n: (4 if isinstance(m, FactorizedLinear) else m.weight.element_size()) for n, m in mods.items()}
    return shapes, elem
