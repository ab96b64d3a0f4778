"""`svd`: truncated SVD of each targeted linear (W ~ U_r S_r V_r^T), rank from the byte budget."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError
from ..base import CompressContext, CompressResult, Method, MethodOption, register, replace_layer
from ..budget import allocate_by_threshold, uniform_rank
from ..finetune import finetune_factors
from ..layers import LowRankLinear
from ..linalg import Factors, output_error, singular_values, truncated_svd
from ..objective import TaskObjective
from ...progress import track

ALLOCATION = MethodOption("allocation", str, "uniform",
                          "rank allocation: same byte ratio per layer, or WeLore's global spectrum threshold",
                          choices=("uniform", "welore"))
FINETUNE_STEPS = MethodOption("finetune-steps", int, 0,
                              "fine-tune only the low-rank factors for K steps on the calibration text before export", min=0)
FINETUNE_LR = MethodOption("finetune-lr", float, None,
                           "Adam learning rate for --finetune-steps (default: 1e-4 for encoders, 1e-5 for decoders)",
                           min=0.0, min_open=True)
# Measured (docs/lowrank-methods.md): at 1e-4 Adam's first steps wreck SmolLM2's whitened factors
# (next-token loss 4.5 -> 20 after one step; perplexity 175 -> 3191 at ratio 0.35), 1e-5 recovers
# (175 -> 97); on MiniLM 1e-4 is the better of the two.
DEFAULT_FINETUNE_LR = {"encoder": 1e-4, "decoder": 1e-5}


class LowRankMethod(Method):
    """Shared driver for every SVD-family method: allocate ranks, factor each layer, swap it in.

    Subclasses override `spectrum` (the singular values that drive allocation) and `factor`
    (the rank-r factors); everything else - budget, dense fallback, records and the optional
    factor-only fine-tuning (`--finetune-steps`, WeLore's LRC-only recipe) - lives here once.
    """

    options = (ALLOCATION, FINETUNE_STEPS, FINETUNE_LR)
    _objective: TaskObjective | None = None

    def uses_calibration(self, options: dict) -> bool:
        return self.needs_calibration or options.get("finetune_steps", 0) > 0

    def task_objective(self, model: nn.Module, ctx: CompressContext) -> TaskObjective:
        """The fine-tuning loss (encoders: token-level distillation against the ORIGINAL model),
        built once, before any layer changes."""
        if self._objective is None:
            self._objective = TaskObjective(ctx.require_calibration(), model, encoder_target="tokens")
        return self._objective

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
        self._objective = None
        if ctx.opt("finetune_steps", 0) > 0:
            self.task_objective(model, ctx)  # capture the original outputs first
        self.prepare(model, targets, ctx)
        ranks = self.ranks(model, targets, ctx)
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
        if ctx.opt("finetune_steps", 0) > 0:
            self.finetune(model, ctx, result)
        return result

    def finish(self, model: nn.Module, ctx: CompressContext, result: CompressResult) -> None:
        """Hook after every layer is swapped (notes, extra report data)."""

    def finetune(self, model: nn.Module, ctx: CompressContext, result: CompressResult) -> None:
        """Train only the LowRankLinear factors (everything else frozen) on the calibration text."""
        steps, objective = ctx.opt("finetune_steps", 0), self.task_objective(model, ctx)
        lr = ctx.opt("finetune_lr", DEFAULT_FINETUNE_LR[objective.kind])
        log = finetune_factors(model, ctx.require_calibration(), objective, steps, lr, ctx.seed)
        s = log.summary()
        result.extra["finetune"] = s | {"loss": objective.description, "losses": [round(x, 5) for x in log.losses]}
        result.notes.append(f"low-rank-factor-only fine-tuning: {steps} steps, lr {s['lr']}, {s['trainable_params']:,} "
                            f"trainable params; {objective.description}; loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}")


@register
class SVDMethod(LowRankMethod):
    name = "svd"
    summary = "truncated SVD per layer (W ~ U_r S_r V_r^T), data-free"


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
