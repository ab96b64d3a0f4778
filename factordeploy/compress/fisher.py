"""Diagonal Fisher information of the targeted weights (for FWSVD), from calibration batches.

F_ij = sum over calibration batches of (dL/dW_ij)^2 with L the model's task loss
(objective.py). Only targeted weights get gradients; everything else is frozen for the
pass and restored afterwards. Memory: `reduce="row"` keeps one float64 value per output
row (what FWSVD uses); `reduce="none"` keeps a float32 matrix per weight (the size of the
targeted weights). Results are cached on the Calibration, so variants share one pass.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..progress import track
from .calibration import Calibration
from .grad import train_only
from .objective import TaskObjective


def fisher_diagonal(model: nn.Module, names: list[str], calibration: Calibration, objective: TaskObjective,
                    reduce: Literal["row", "none"] = "row", seed: int = 0) -> dict[str, torch.Tensor]:
    """Accumulated squared gradients per targeted weight (or their per-row sums)."""
    key = f"fisher/{reduce}/{seed}"
    cached = calibration.cache.setdefault(key, {})
    missing = [n for n in names if n not in cached]
    if missing:
        cached.update(_accumulate(model, missing, calibration, objective, reduce, seed))
    return {n: cached[n] for n in names}


def _accumulate(model: nn.Module, names: list[str], calibration: Calibration, objective: TaskObjective,
                reduce: str, seed: int) -> dict[str, torch.Tensor]:
    weights = {n: model.get_submodule(n).weight for n in names}
    gen = torch.Generator().manual_seed(seed) if objective.kind == "encoder" else None
    acc: dict[str, torch.Tensor] = {}
    with train_only(model, weights.values()):
        model.eval()
        for i, batch in enumerate(track(calibration.batches(), f"Fisher ({objective.kind} task loss)",
                                        total=calibration.num_batches())):
            loss = objective.loss(model, i, batch, sample_targets=gen)
            loss.backward()
            for n, w in weights.items():
                g2 = w.grad.detach() ** 2
                g2 = g2.sum(1, dtype=torch.float64) if reduce == "row" else g2
                acc[n] = acc[n] + g2 if n in acc else g2
                w.grad = None
    return acc


def row_importance(fisher_rows: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """FWSVD row weights: row Fisher sums normalised by their max, plus eps (public FWSVD code)."""
    f = fisher_rows.to(torch.float64)
    m = float(f.max())
    return (f / m if m > 0 else torch.ones_like(f)) + eps


def output_sensitivity(model: nn.Module, names: list[str], calibration: Calibration, objective: TaskObjective,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean squared loss gradient per OUTPUT feature of each targeted linear, g2_j = E_t[(dL/dy_tj)^2].

    Second-order view of a weight change E = W - W_hat: the loss rises by about
    0.5 * sum_j g2_j * ||(E L)_j||^2 with L L^T = X^T X (diagonal Fisher of the outputs, tokens
    independent), which puts every layer's output error on the loss's one scale (what `auto` sums
    across layers). One backward per calibration batch through the activations only: no weight
    gradient is formed. Cached on the Calibration like `fisher_diagonal`.
    """
    key = f"output-sensitivity/{seed}"
    cached = calibration.cache.setdefault(key, {})
    missing = [n for n in names if n not in cached]
    if missing:
        cached.update(_output_grads(model, missing, calibration, objective, seed))
    return {n: cached[n] for n in names}


def _output_grads(model: nn.Module, names: list[str], calibration: Calibration, objective: TaskObjective,
                  seed: int) -> dict[str, torch.Tensor]:
    acc: dict[str, torch.Tensor] = {}
    count = dict.fromkeys(names, 0)

    def on_output(name: str):
        def fwd(_mod, _inp, out):
            if not out.requires_grad:  # nothing upstream needs a gradient: make the output a graph leaf
                out.requires_grad_(True)

            def grad_hook(g: torch.Tensor) -> None:
                g2 = g.detach().to(torch.float64).pow(2).reshape(-1, g.shape[-1])
                acc[name] = acc[name] + g2.sum(0) if name in acc else g2.sum(0)
                count[name] += g2.shape[0]
            out.register_hook(grad_hook)
        return fwd

    gen = torch.Generator().manual_seed(seed) if objective.kind == "encoder" else None
    handles = [model.get_submodule(n).register_forward_hook(on_output(n)) for n in names]
    try:
        with train_only(model, []), torch.enable_grad():
            model.eval()
            for i, batch in enumerate(track(calibration.batches(), f"output sensitivity ({objective.kind} task loss)",
                                            total=calibration.num_batches())):
                objective.loss(model, i, batch, sample_targets=gen).backward()
    finally:
        for h in handles:
            h.remove()
    return {n: acc[n] / max(count[n], 1) for n in names}
