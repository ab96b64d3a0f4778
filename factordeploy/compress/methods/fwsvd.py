"""`fwsvd`: Fisher-weighted SVD (Hsu et al., ICLR 2022).

Fisher F = accumulated squared gradients of the model's task loss on the calibration
data (compress/fisher.py; next-token loss for decoders, embedding distillation for
encoders - see compress/objective.py). Row importance I_i = sum_j F_ij over the output
row of W (out x in), normalised by its max plus eps 1e-5; SVD of diag(sqrt(I)) W, rows
divided back (linalg.row_weighted_svd). With `--allocation welore` the threshold runs on
the spectra of diag(sqrt(I)) W.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import CompressContext, CompressResult, register
from ..fisher import fisher_diagonal, row_importance
from ..linalg import Factors, row_weighted_svd, singular_values
from ..objective import TaskObjective
from .svd import LowRankMethod, error_metrics

EPS = 1e-5


@register
class FWSVDMethod(LowRankMethod):
    name = "fwsvd"
    summary = "Fisher-weighted SVD: output rows weighted by their task-loss Fisher importance"
    needs_calibration = True

    def prepare(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> None:
        calib = ctx.require_calibration()
        self.objective = TaskObjective(calib, model)  # the task loss (encoders: sentence embeddings)
        rows = fisher_diagonal(model, targets, calib, self.objective, reduce="row", seed=ctx.seed)
        self.importance = {n: row_importance(r, EPS) for n, r in rows.items()}

    def spectrum(self, name: str, W: torch.Tensor) -> torch.Tensor:
        d = self.importance[name].sqrt()
        return singular_values(d[:, None] * W.to(torch.float64))

    def factor(self, name: str, W: torch.Tensor, rank: int) -> Factors:
        return row_weighted_svd(W, self.importance[name], rank)

    def metrics(self, name: str, W: torch.Tensor, f: Factors) -> dict:
        m = error_metrics(W, f)
        imp = self.importance[name]
        m["importance_spread"] = float(imp.max() / imp.median())  # how far from plain SVD the weighting is
        return m

    def finish(self, model: nn.Module, ctx: CompressContext, result: CompressResult) -> None:
        result.notes.append(f"Fisher from {self.objective.description}; row importance = row sum / max + {EPS}")
