"""Byte budgets: turn `--ratio` into per-layer ranks.

`ratio` is the fraction of the targeted layers' stored weight bytes to remove
(ratio 0.5 keeps half). A layer whose factored form would not be smaller stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
