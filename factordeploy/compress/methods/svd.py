"""`svd`: truncated SVD of each targeted linear (W ~ U_r S_r V_r^T), rank from the byte budget."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError
from ..base import CompressContext, CompressResult, Method, MethodOption, register, replace_layer
from ..budget import allocate_by_error, allocate_by_threshold, uniform_rank
from ..layers import LowRankLinear
from ..linalg import Factors, output_error, singular_values, svd, truncated_svd
from ...progress import track

ALLOCATION = MethodOption("allocation", str, "uniform",
                          "rank allocation: same byte ratio per layer, WeLore's global spectrum threshold, or measured "
                          "(ranks minimising the summed calibration output error of every layer within the budget)",
                          choices=("uniform", "welore", "measured"))


class LowRankMethod(Method):
    """Shared driver for every SVD-family method: allocate ranks, factor each layer, swap it in.

    Subclasses override `spectrum` (the singular values that drive allocation) and `factor`
    (the rank-r factors); everything else - budget, dense fallback, records - lives here once.
    Training the factors afterwards (WeLore's LRC-only tuning) is the build's recovery stage
    (`--recover-steps N --adapter none`, recover/), shared by every method.
    """

    options = (ALLOCATION,)

    def uses_calibration(self, options: dict) -> bool:
        return self.needs_calibration or options.get("allocation") == "measured"

    def error_curve(self, name: str, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Relative squared calibration output error ||X (W - W_r)^T||^2 / ||X W^T||^2 at every rank r
        (r = 0 .. full) of this method's factors. Plain SVD: W - W_r = sum_{i>r} s_i u_i v_i^T and the u_i
        are orthonormal, so the error is sum_{i>r} s_i^2 v_i^T G v_i (one SVD, no refactoring)."""
        _, S, Vh = svd(W)
        q = S ** 2 * torch.einsum("ri,ij,rj->r", Vh, G.to(torch.float64), Vh)
        return _tail_curve(q)

    def prepare(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> None:
        """Hook for data collection before any layer changes (calibration statistics etc.)."""

    def spectrum(self, name: str, W: torch.Tensor) -> torch.Tensor:
        return singular_values(W)

    def factor(self, name: str, W: torch.Tensor, rank: int) -> Factors:
        return truncated_svd(W, rank)

    def metrics(self, name: str, W: torch.Tensor, f: Factors) -> dict:
        w = float(W.double().norm())
        return {"weight_rel_error": float(f.dropped.double().norm()) / w if w else 0.0}

    def allocation(self, ctx: CompressContext) -> str:
        """'uniform' or 'welore' (global threshold); methods that ARE an allocation override this."""
        return ctx.opt("allocation", "uniform")

    def ranks(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> dict[str, int]:
        shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in targets}
        if self.allocation(ctx) == "measured":
            if type(self).error_curve is LowRankMethod.error_curve and self.factor.__func__ is not LowRankMethod.factor:
                raise UserError(f"--allocation measured is not available for {self.name}",
                                "use it with svd or svd-whiten, or pick --allocation uniform|welore")
            grams = ctx.require_calibration().grams(model, targets)
            curves = {n: self.error_curve(n, model.get_submodule(n).weight.detach(), grams[n])
                      for n in track(targets, "measured output error per rank")}
            try:
                alloc = allocate_by_error(curves, shapes, ctx.ratio, elem=model.get_submodule(targets[0]).weight.element_size())
            except ValueError as e:
                raise UserError(f"--ratio {ctx.ratio} cannot be met by measured allocation ({e})", "use a smaller --ratio") from e
            self.allocation_note = (f"measured allocation: ranks minimising the summed relative calibration output error "
                                    f"(sum {alloc.error:.4g}), bytes {alloc.bytes_after}/{alloc.bytes_budget} budget")
            return alloc.ranks
        if self.allocation(ctx) == "welore":
            spectra = {n: self.spectrum(n, model.get_submodule(n).weight.detach())
                       for n in track(targets, "spectra for allocation")}
            try:
                alloc = allocate_by_threshold(spectra, shapes, ctx.ratio, min_reduction=ctx.opt("min_reduction", 0.0))
            except ValueError as e:
                raise UserError(f"--ratio {ctx.ratio} cannot be met by threshold allocation ({e})",
                                "use a smaller --ratio or a smaller --min-reduction") from e
            self.allocation_note = f"welore allocation: tau={alloc.tau:.4f}, bytes {alloc.bytes_after}/{alloc.bytes_budget} budget"
            return alloc.ranks
        self.allocation_note = "uniform allocation: each layer keeps (1 - ratio) of its bytes"
        return {n: uniform_rank(o, i, ctx.ratio) for n, (o, i) in shapes.items()}

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        self.prepare(model, targets, ctx)
        planned = ctx.plan.get("ranks")
        ranks = {n: planned[n] for n in targets} if planned else self.ranks(model, targets, ctx)
        records = []
        for name in track(targets, f"{self.name} layers"):
            layer = model.get_submodule(name)
            r = ranks[name]
            if r <= 0:
                records.append(replace_layer(model, name, None))
                continue
            W = layer.weight.detach().to(ctx.device)
            f = self.factor(name, W, r)
            new = LowRankLinear(f.A.to(layer.weight.dtype), f.B.to(layer.weight.dtype), layer.bias).to(layer.weight.device)
            records.append(replace_layer(model, name, new, self.metrics(name, W, f)))
        result = CompressResult(records, notes=[self.allocation_note])
        self.finish(model, ctx, result)
        return result

    def finish(self, model: nn.Module, ctx: CompressContext, result: CompressResult) -> None:
        """Hook after every layer is swapped (notes, extra report data)."""

    def plan(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> dict | None:
        """Block-wise runs: a global allocation is made once over every target (original statistics)."""
        if self.allocation(ctx) == "uniform":
            return None
        self.prepare(model, targets, ctx)
        return {"ranks": self.ranks(model, targets, ctx)}


@register
class SVDMethod(LowRankMethod):
    name = "svd"
    summary = "truncated SVD per layer (W ~ U_r S_r V_r^T), data-free"


def _tail_curve(q: torch.Tensor) -> torch.Tensor:
    """e[r] = sum_{i >= r} q_i / sum q for r = 0 .. len(q) (component i dropped when r <= i)."""
    tail = torch.flip(torch.cumsum(torch.flip(q.to(torch.float64), [0]), 0), [0])
    total = float(tail[0]) if q.numel() else 0.0
    return torch.cat([tail, torch.zeros(1, dtype=torch.float64)]) / (total if total > 0 else 1.0)


def error_metrics(W: torch.Tensor, f: Factors, gram: torch.Tensor | None = None) -> dict:
    """Relative weight error ||W - BA|| / ||W|| and, with a Gram matrix, the relative output
    error ||X (W - BA)^T|| / ||X W^T|| on the calibration activations."""
    W64 = W.detach().to(torch.float64)
    W_hat = f.B.to(torch.float64) @ f.A.to(torch.float64)
    w = float(W64.norm())
    out = {"weight_rel_error": float((W64 - W_hat).norm()) / w if w else 0.0}
    if gram is not None:
        ref = output_error(W64, torch.zeros_like(W64), gram)
        out["output_rel_error"] = output_error(W64, W_hat, gram) / ref if ref else 0.0
    return out
