"""Sparse + low-rank fitting shared by `sltrain` and `lost` (compress/methods/).

Both methods store W ~ B A + (a sparse part) and fit it to the calibration output error
||X (W - W_hat)^T||_F = ||(W - W_hat) L||_F (L L^T = X^T X, linalg.gram_factor). The fit is a
block-coordinate descent on that one objective:

1. low-rank step: whitened SVD of W - S (linalg.whitened_svd, the optimum for fixed S);
2. sparse step: least squares of the residual W - B A on the sparse part's fixed pattern in the
   same metric (linalg.support_lstsq for SLTrain's entries, linalg.channel_lstsq for LOST's
   input channels); the pattern is chosen once, from the first residual (or at random).

Each step is optimal given the other, so the error never increases; iteration 1 with S = 0 is
plain whitened SVD at the smaller rank the sparse part leaves, and the report compares every
layer with whitened SVD at the SAME bytes (its error is read off the first spectrum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .base import CompressContext, CompressResult, Method, MethodOption, replace_layer
from .budget import rank_after_extra, uniform_rank
from .linalg import damped_gram, gram_factor, whitened_svd
from ..progress import track

# sparse step: residual (out x in) -> (dense-shaped sparse part, payload for the layer)
ALT_ITERS = MethodOption("alt-iters", int, 4, "alternating rounds of whitened SVD and sparse least squares per layer",
                         min=1, max=1000)
SparseStep = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


@dataclass
class SparseLowRankFit:
    A: torch.Tensor
    B: torch.Tensor
    payload: Any
    rel_errors: list[float] = field(default_factory=list)  # ||(W - W_hat) L|| / ||W L|| after each iteration
    spectrum: torch.Tensor | None = None  # singular values of W L (iteration 1): whitened SVD's error at any rank


def whitened_rel_error(E: torch.Tensor, L: torch.Tensor, ref: float) -> float:
    return float((E.to(torch.float64) @ L).norm()) / ref if ref else 0.0


def alternate(W: torch.Tensor, L: torch.Tensor, rank: int, sparse_step: SparseStep, iters: int) -> SparseLowRankFit:
    """`iters` rounds of (whitened SVD of W - S, sparse least squares of W - B A)."""
    W64 = W.detach().to(torch.float64)
    ref = float((W64 @ L.to(torch.float64)).norm())
    S = torch.zeros_like(W64)
    fit = None
    for _ in range(max(iters, 1)):
        f = whitened_svd(W64 - S, L, rank)
        R = W64 - f.B @ f.A
        S, payload = sparse_step(R)
        fit = fit or SparseLowRankFit(f.A, f.B, payload, spectrum=torch.cat([f.kept, f.dropped]))
        fit.A, fit.B, fit.payload = f.A, f.B, payload
        fit.rel_errors.append(whitened_rel_error(R - S, L, ref))
    return fit


class SparseLowRankMethod(Method):
    """Driver: per targeted layer, split its byte budget between rank and the sparse part, fit,
    swap in the layer; records carry the calibration error next to whitened SVD at equal bytes."""

    needs_calibration = True

    def sparse_bytes(self, out_f: int, in_f: int, elem: int, ctx: CompressContext) -> int:
        raise NotImplementedError

    def sparse_step(self, name: str, W: torch.Tensor, G: torch.Tensor, ctx: CompressContext,
                    gen: torch.Generator) -> SparseStep:
        raise NotImplementedError

    def make_layer(self, layer: nn.Linear, fit: SparseLowRankFit, ctx: CompressContext) -> nn.Module:
        raise NotImplementedError

    def describe_options(self, ctx: CompressContext) -> str:
        return ""

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        grams = ctx.require_calibration().grams(model, targets)
        chol: dict[int, torch.Tensor] = {}
        iters = int(ctx.opt("alt_iters", 4))
        records, kept_dense, gains = [], 0, []
        for j, name in enumerate(track(targets, f"{self.name} layers")):
            layer = model.get_submodule(name)
            W = layer.weight.detach().to(ctx.device)
            out_f, in_f = W.shape
            elem = layer.weight.element_size()
            rank = rank_after_extra(out_f, in_f, ctx.ratio, self.sparse_bytes(out_f, in_f, elem, ctx), elem)
            if rank < 1:
                records.append(replace_layer(model, name, None, {"chosen": "dense (sparse part leaves no rank)"}))
                kept_dense += 1
                continue
            G = grams[name].to(ctx.device)
            if id(grams[name]) not in chol:  # q/k/v (gate/up) share one Gram -> one Cholesky
                chol[id(grams[name])] = gram_factor(G)
            L = chol[id(grams[name])]
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + j)
            fit = alternate(W, L, rank, self.sparse_step(name, W, damped_gram(L), ctx, gen), iters)
            new = self.make_layer(layer, fit, ctx).to(layer.weight.device)
            metrics = {"rank": rank, "calib_rel_error": fit.rel_errors[-1],
                       "error_per_iter": [round(e, 5) for e in fit.rel_errors]}
            r_ref = uniform_rank(out_f, in_f, ctx.ratio)
            if r_ref > 0:
                spec = fit.spectrum.to(torch.float64)
                svd_err = float(spec[r_ref:].norm() / spec.norm())
                metrics |= {"svd_rank_equal_bytes": r_ref, "svd_calib_rel_error": svd_err}
                if svd_err > 0:
                    gains.append(fit.rel_errors[-1] / svd_err)
            records.append(replace_layer(model, name, new, metrics))
        notes = [f"{self.name}: {self.describe_options(ctx)}; {iters} alternating iteration(s) of whitened SVD and "
                 f"sparse least squares on the calibration Gram; {kept_dense} layer(s) kept dense"]
        if gains:
            notes.append(f"calibration output error vs whitened SVD at equal bytes: median ratio "
                         f"{float(torch.tensor(gains).median()):.3f} over {len(gains)} layers (< 1 = better)")
        return CompressResult(records, notes=notes)
