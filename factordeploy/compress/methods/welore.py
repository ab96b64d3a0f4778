"""`welore`: WeLore (Jaiswal et al. 2024) - global threshold rank allocation + LRC-only fine-tuning.

Per matrix the singular values are min-max normalised; one global tau (found by bisection,
budget.allocate_by_threshold) prunes those below it, so each matrix keeps a rank set by its
own spectrum's shape. A matrix whose rank reduction is below `--min-reduction` stays dense
(N-LRC); the rest become LowRankLinear (LRC) with balanced factors U sqrt(S), sqrt(S) V^T.
WeLore's LRC-only tuning is the build's recovery stage with `--adapter none` (the factors
themselves train, by distillation from the original; recover/). WeLore IS an allocation, so it takes no --allocation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import CompressContext, CompressResult, MethodOption, register
from ..linalg import Factors, truncated_svd
from .svd import LowRankMethod

MIN_REDUCTION = MethodOption("min-reduction", float, 0.5,
                             "WeLore: a matrix becomes low-rank (LRC) only if its rank drops by at least this fraction",
                             min=0.0, max=1.0)


@register
class WeLoreMethod(LowRankMethod):
    name = "welore"
    summary = "WeLore: global threshold on normalised spectra, LRC/N-LRC split, optional LRC-only fine-tuning"
    options = (MIN_REDUCTION,)

    def allocation(self, ctx: CompressContext) -> str:
        return "welore"

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
