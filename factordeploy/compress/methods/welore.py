"""`welore`: WeLore (Jaiswal et al. 2024) - global threshold rank allocation + LRC-only fine-tuning.

Per matrix the singular values are min-max normalised; one global tau (found by bisection,
budget.allocate_by_threshold) prunes those below it, so each matrix keeps a rank set by its
own spectrum's shape. A matrix whose rank reduction is below `--min-reduction` stays dense
(N-LRC); the rest become LowRankLinear (LRC) with balanced factors U sqrt(S), sqrt(S) V^T.
`--finetune-steps K` then trains only the LRC factors on the calibration text with the
model's own loss (compress/finetune.py). WeLore IS an allocation, so it takes no --allocation.
"""

from __future__ import annotations

import click
import torch
from torch import nn

from ..base import CompressContext, CompressResult, MethodOption, register
from ..finetune import finetune_factors
from ..linalg import Factors, truncated_svd
from ..objective import TaskObjective
from .svd import LowRankMethod

MIN_REDUCTION = MethodOption("min-reduction", click.FloatRange(0.0, 1.0), 0.5,
                             "WeLore: a matrix becomes low-rank (LRC) only if its rank drops by at least this fraction")
FINETUNE_STEPS = MethodOption("finetune-steps", click.IntRange(min=0), 0,
                              "fine-tune only the low-rank factors for K steps on the calibration text before export")
FINETUNE_LR = MethodOption("finetune-lr", click.FloatRange(min=0.0, min_open=True), 1e-4,
                           "Adam learning rate for --finetune-steps")


@register
class WeLoreMethod(LowRankMethod):
    name = "welore"
    summary = "WeLore: global threshold on normalised spectra, LRC/N-LRC split, optional LRC-only fine-tuning"
    options = (MIN_REDUCTION, FINETUNE_STEPS, FINETUNE_LR)
    needs_calibration = True  # only used with --finetune-steps > 0

    def allocation(self, ctx: CompressContext) -> str:
        return "welore"

    def prepare(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> None:
        self.objective = None
        if ctx.opt("finetune_steps", 0) > 0:  # original embeddings must be captured before any change
            self.objective = TaskObjective(ctx.require_calibration(), model)

    def factor(self, name: str, W: torch.Tensor, rank: int) -> Factors:
        return truncated_svd(W, rank, balanced=True)

    def finish(self, model: nn.Module, ctx: CompressContext, result: CompressResult) -> None:
        table = []
        for r in result.layers:
            full = min(r.before["in"], r.before["out"])
            rank = r.after.get("rank")
            table.append({"layer": r.name, "shape": [r.before["out"], r.before["in"]], "full_rank": full,
                          "rank": rank, "component": "LRC" if rank else "N-LRC",
                          "rank_reduction": round(1 - rank / full, 4) if rank else 0.0})
        lrc = [t for t in table if t["component"] == "LRC"]
        lrc_bytes = sum(r.bytes_before for r in result.layers if r.after.get("rank"))
        split = {"lrc": len(lrc), "nlrc": len(table) - len(lrc), "min_reduction": ctx.opt("min_reduction", 0.5),
                 "lrc_share_of_targeted_bytes_before": round(lrc_bytes / max(result.bytes_before, 1), 4)}
        result.extra["rank_table"] = table
        result.extra["split"] = split
        result.notes.append(f"WeLore split: {split['lrc']} LRC (low-rank) / {split['nlrc']} N-LRC (dense) matrices, "
                            f"min rank reduction {split['min_reduction']}")
        steps = ctx.opt("finetune_steps", 0)
        if steps > 0:
            assert self.objective is not None
            log = finetune_factors(model, ctx.calibration, self.objective, steps, ctx.opt("finetune_lr", 1e-4), ctx.seed)
            s = log.summary()
            result.extra["finetune"] = s | {"loss": self.objective.description, "losses": [round(x, 5) for x in log.losses]}
            result.notes.append(f"LRC-only fine-tuning: {steps} steps, lr {s['lr']}, {s['trainable_params']:,} trainable "
                                f"params; {self.objective.description}; loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}")
