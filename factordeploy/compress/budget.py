"""Byte budgets: turn `--ratio` into per-layer ranks.

`ratio` is the fraction of the targeted layers' stored weight bytes to remove
(ratio 0.5 keeps half). A layer whose factored form would not be smaller stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def lowrank_bytes(out_f: int, in_f: int, rank: int, elem: int = 4) -> int:
    return rank * (out_f + in_f) * elem


def max_useful_rank(out_f: int, in_f: int) -> int:
    """Largest rank whose factors are strictly smaller than the dense matrix."""
    return math.ceil(out_f * in_f / (out_f + in_f)) - 1


def uniform_rank(out_f: int, in_f: int, ratio: float) -> int:
    """Rank that keeps (1 - ratio) of this layer's bytes; 0 means 'stay dense'."""
    r = math.floor((1.0 - ratio) * out_f * in_f / (out_f + in_f))
    r = min(r, max_useful_rank(out_f, in_f))
    return max(r, 0) if r >= 1 else 0


@dataclass
class ThresholdAllocation:
    """WeLore-style global allocation: one threshold tau over min-max-normalised spectra."""

    ranks: dict[str, int]
    tau: float
    bytes_after: int
    bytes_budget: int


def welore_ranks(spectra: dict[str, torch.Tensor], tau: float) -> dict[str, int]:
    """k = full rank - #(normalised singular values < tau), per matrix."""
    ranks = {}
    for name, s in spectra.items():
        s = s.to(torch.float64)
        span = (s.max() - s.min()).clamp_min(1e-30)
        d = (s - s.min()) / span
        ranks[name] = int(s.numel() - int((d < tau).sum()))
    return ranks


def allocate_by_threshold(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                          ratio: float, elem: int = 4, min_reduction: float = 0.0,
                          iters: int = 60) -> ThresholdAllocation:
    """Bisect tau so the total stored bytes (factored or dense) meet the budget.

    A matrix is factored only when its rank reduction (1 - k/full) is at least
    `min_reduction` and its factors are smaller than the dense matrix; otherwise it
    stays dense (rank reported as 0). Bytes are monotone in tau, so bisection converges;
    the result is the smallest tau that meets the budget.
    """
    dense_total = sum(o * i * elem for o, i in shapes.values())
    budget = int((1.0 - ratio) * dense_total)

    def evaluate(tau: float) -> tuple[dict[str, int], int]:
        raw = welore_ranks(spectra, tau)
        out, total = {}, 0
        for name, k in raw.items():
            o, i = shapes[name]
            full = min(o, i)
            k = max(k, 1)
            if (1 - k / full) >= min_reduction and k <= max_useful_rank(o, i):
                out[name] = k
                total += lowrank_bytes(o, i, k, elem)
            else:
                out[name] = 0
                total += o * i * elem
        return out, total

    lo, hi = 0.0, 1.0 + 1e-9
    ranks, total = evaluate(hi)
    if total > budget:
        raise ValueError("budget cannot be met even at rank 1")
    for _ in range(iters):
        mid = (lo + hi) / 2
        r, t = evaluate(mid)
        if t <= budget:
            hi, ranks, total = mid, r, t
        else:
            lo = mid
    return ThresholdAllocation(ranks=ranks, tau=hi, bytes_after=total, bytes_budget=budget)


def rank_after_extra(out_f: int, in_f: int, ratio: float, extra_bytes: int, elem: int = 4) -> int:
    """Largest rank whose factors fit beside `extra_bytes` of other storage (a sparse part) within
    the layer's (1 - ratio) byte budget; 0 means the extra part leaves no room for rank 1."""
    budget = math.floor((1.0 - ratio) * out_f * in_f * elem)
    return max((budget - extra_bytes) // ((out_f + in_f) * elem), 0)


@dataclass
class ErrorAllocation:
    """`--allocation measured`: ranks minimising the summed relative output error within the byte budget."""

    ranks: dict[str, int]
    lam: float
    bytes_after: int
    bytes_budget: int
    error: float  # sum over layers of the chosen relative squared output errors


def allocate_by_error(curves: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float,
                      elem: int = 4, iters: int = 80) -> ErrorAllocation:
    """Choose per layer a rank r (or dense: error 0, full bytes) minimising sum_l e_l(r_l) subject to
    sum_l bytes_l(r_l) <= (1 - ratio) x the dense bytes, by the Lagrangian: each layer takes
    argmin_r e_l(r) + lam * bytes_l(r), and lam is bisected (log scale) to the smallest value that
    meets the budget; the bytes that the Lagrangian leaves unused (its duality gap: a layer whose error
    falls linearly jumps between rank 1 and dense) are then spent greedily, one rank at a time, on the
    largest error decrease per byte. `curves[name][r]` = relative squared output error at rank r
    (r = 0 .. full rank), measured on the calibration activations."""
    dense_total = sum(o * i * elem for o, i in shapes.values())
    budget = int((1.0 - ratio) * dense_total)
    opts = {}
    for n, (o, i) in shapes.items():
        rmax = max_useful_rank(o, i)
        e = curves[n].to(torch.float64)
        r = torch.arange(1, rmax + 1)
        errs = torch.cat([torch.zeros(1, dtype=torch.float64), e[1:rmax + 1]])  # slot 0 = dense
        byts = torch.cat([torch.tensor([o * i * elem], dtype=torch.float64), (r * (o + i) * elem).to(torch.float64)])
        opts[n] = (errs, byts)

    lam, ranks, total, err = lagrangian(opts, budget, iters)
    ranks, total, err = _greedy_fill(ranks, opts, budget, total, err, _next_rank)
    return ErrorAllocation(ranks, lam, total, budget, err)


Options = dict[str, tuple[torch.Tensor, torch.Tensor]]  # per layer: (errors, bytes) of its candidate forms


def lagrangian(opts: Options, budget: int, iters: int = 80) -> tuple[float, dict[str, int], int, float]:
    """Each layer takes argmin_j e_j + lam * bytes_j; lam bisected (log scale) to the smallest value whose
    choices fit `budget`. Returns (lam, choice per layer, total bytes, summed error); ValueError when even
    the cheapest choices do not fit."""
    def pick(lam: float) -> tuple[dict[str, int], int, float]:
        ranks, total, err = {}, 0, 0.0
        for n, (errs, byts) in opts.items():
            j = int(torch.argmin(errs + lam * byts))
            ranks[n] = j
            total += int(byts[j])
            err += float(errs[j])
        return ranks, total, err

    lo, hi = -40.0, 10.0  # log10 lam (errors are relative, bytes up to ~1e8)
    ranks, total, err = pick(10.0 ** hi)
    if total > budget:
        raise ValueError("budget cannot be met even at rank 1")
    for _ in range(iters):
        mid = (lo + hi) / 2
        r, t, e = pick(10.0 ** mid)
        if t <= budget:
            hi, ranks, total, err = mid, r, t, e
        else:
            lo = mid
    return 10.0 ** hi, ranks, total, err


@dataclass
class ChoiceAllocation:
    """A multiple-choice knapsack solution: one candidate index per layer."""

    choice: dict[str, int]
    lam: float
    bytes_after: int
    bytes_budget: int
    error: float


def allocate_choices(opts: Options, budget: int, iters: int = 80) -> ChoiceAllocation:
    """One candidate per layer minimising the summed error within `budget` bytes: the Lagrangian of
    `allocate_by_error`, then the leftover bytes spent greedily on the upgrade (any candidate with a lower
    error) of largest error decrease per byte. `opts[name] = (errors, bytes)`, one entry per candidate."""
    lam, choice, total, err = lagrangian(opts, budget, iters)
    choice, total, err = _greedy_fill(choice, opts, budget, total, err, _any_better)
    return ChoiceAllocation(choice, lam, total, budget, err)


def allocate_choices_within(opts: Options, budget: int, costs: dict[str, torch.Tensor], cost_budget: float,
                            iters: int = 40) -> ChoiceAllocation | None:
    """`allocate_choices` under a second budget on another cost per candidate (e.g. measured latency):
    a Lagrange multiplier mu on that cost, errors + mu * cost, bisected (log scale) to the smallest mu
    whose byte-feasible plan also fits `cost_budget`. None when no mu makes both fit. The returned
    `error` is the plain summed error of the plan (without the mu term)."""
    def at(mu: float) -> tuple[ChoiceAllocation | None, float]:
        shifted = {n: (e + mu * costs[n].to(e.dtype), b) for n, (e, b) in opts.items()}
        try:
            a = allocate_choices(shifted, budget)
        except ValueError:
            return None, math.inf
        return a, sum(float(costs[n][j]) for n, j in a.choice.items())

    def plain(a: ChoiceAllocation) -> ChoiceAllocation:
        return ChoiceAllocation(a.choice, a.lam, a.bytes_after, a.bytes_budget,
                                sum(float(opts[n][0][j]) for n, j in a.choice.items()))

    a, c = at(0.0)
    if a is None:
        return None
    if c <= cost_budget:
        return plain(a)
    scale = sum(float(e.max()) for e, _ in opts.values()) / max(cost_budget, 1e-30) or 1.0
    lo, hi = math.log10(scale) - 12, math.log10(scale) + 6
    best, c = at(10.0 ** hi)
    if best is None or c > cost_budget:
        return None
    for _ in range(iters):
        mid = (lo + hi) / 2
        a, c = at(10.0 ** mid)
        if a is not None and c <= cost_budget:
            hi, best = mid, a
        else:
            lo = mid
    return plain(best)


def _next_rank(errs: torch.Tensor, j: int) -> list[int]:
    """Rank curves: one more rank, or dense (slot 0) after the last rank; dense has no upgrade."""
    return [] if j == 0 else [j + 1 if j + 1 < len(errs) else 0]


def _any_better(errs: torch.Tensor, j: int) -> list[int]:
    return [k for k in range(len(errs)) if k != j]


def _greedy_fill(ranks: dict[str, int], opts: Options, budget: int, total: int, err: float,
                 upgrades: Callable[[torch.Tensor, int], list[int]]) -> tuple[dict[str, int], int, float]:
    """Spend what the Lagrangian left unused: repeatedly take the fitting upgrade (`upgrades(errs, j)`:
    the slots a layer at slot j may move to) of largest error decrease per byte."""
    import heapq

    ranks = dict(ranks)

    def step(n: str):  # (-gain per byte, cost, next slot) of this layer's best upgrade that still fits
        errs, byts = opts[n]
        j, best = ranks[n], None
        for k in upgrades(errs, j):
            cost = int(byts[k] - byts[j])
            gain = float(errs[j] - errs[k])
            if gain > 0 and cost > 0 and total + cost <= budget:
                s = (-(gain / cost), cost, k)
                best = s if best is None or s < best else best
        return best

    heap = [(s[0], n, s[1], s[2]) for n in ranks if (s := step(n)) is not None]
    heapq.heapify(heap)
    while heap:
        g, n, cost, nxt = heapq.heappop(heap)
        if total + cost > budget:  # the budget left shrank since this upgrade was scored
            if (s := step(n)) is not None:
                heapq.heappush(heap, (s[0], n, s[1], s[2]))
            continue
        errs = opts[n][0]
        err += float(errs[nxt] - errs[ranks[n]])
        total += cost
        ranks[n] = nxt
        if (s := step(n)) is not None:
            heapq.heappush(heap, (s[0], n, s[1], s[2]))
    return ranks, total, err
