"""Fine-tune only the LowRankLinear factors (A, B) on calibration text; everything else frozen.

WeLore's claim: tuning only the low-rank components recovers quality. The loss is the
model's own (objective.py: next-token for decoders, embedding distillation for encoders).
The model stays in eval mode (dropout off) so the run is deterministic for a seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..progress import track
from .calibration import Calibration
from .grad import train_only
from .layers import LowRankLinear
from .objective import TaskObjective


@dataclass
class FinetuneLog:
    steps: int
    lr: float
    trainable_params: int
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        k = max(1, min(10, len(self.losses) // 4))
        first = sum(self.losses[:k]) / k if self.losses else float("nan")
        last = sum(self.losses[-k:]) / k if self.losses else float("nan")
        return {"steps": self.steps, "lr": self.lr, "trainable_params": self.trainable_params,
                "loss_first": round(first, 5), "loss_last": round(last, 5), "window": k}


def lowrank_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.A, m.B)]


def balance_lowrank(model: nn.Module) -> None:
    """Balance every LowRankLinear's factors before training (same product, comparable scales)."""
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.balance_()


def finetune_factors(model: nn.Module, calibration: Calibration, objective: TaskObjective,
                     steps: int, lr: float = 1e-4, seed: int = 0) -> FinetuneLog:
    """`steps` Adam steps over the calibration batches (cycled in order)."""
    params = lowrank_parameters(model)
    log = FinetuneLog(steps, lr, sum(p.numel() for p in params))
    if steps <= 0 or not params:
        return log
    torch.manual_seed(seed)
    balance_lowrank(model)  # Adam's per-element step needs A and B on the same scale
    batches = list(calibration.batches())
    with train_only(model, params):
        opt = torch.optim.Adam(params, lr=lr)
        model.eval()
        cycle = itertools.cycle(enumerate(batches))
        for _ in track(range(steps), f"fine-tune low-rank factors ({objective.kind})"):
            i, batch = next(cycle)
            opt.zero_grad(set_to_none=True)
            loss = objective.loss(model, i, batch)
            loss.backward()
            opt.step()
            log.losses.append(float(loss.detach()))
    return log


@torch.no_grad()
def calibration_loss(model: nn.Module, calibration: Calibration, objective: TaskObjective) -> float:
    """Mean task loss over all calibration batches (for tests and reports)."""
    model.eval()
    vals = [float(objective.loss(model, i, b)) for i, b in enumerate(calibration.batches())]
    return sum(vals) / len(vals)
