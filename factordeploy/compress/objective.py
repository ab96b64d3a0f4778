"""The model's own task loss on calibration batches, shared by Fisher (FWSVD) and fine-tuning (WeLore).

Decoders: next-token cross-entropy on the calibration window (labels = the text itself).
Encoders (no task head): distillation between the ORIGINAL model's sentence embeddings
and the current model's, both masked-mean-pooled and L2-normalised (the embedding the
quality probe scores): 0.5 * ||e_cur - e_orig||^2 = 1 - cos. The original embeddings of
every calibration batch are computed once, before any layer changes, and cached on the
Calibration (see `TaskObjective.__init__`).

At the original weights the distillation loss and its gradient are exactly zero, so the
empirical Fisher would vanish. For Fisher we therefore use the model's Gaussian
observation Fisher: targets sampled around the original embedding, y = e_orig + n,
n ~ N(0, I). Then grad = -J^T n and E[grad^2] = diag(J^T J) (per weight), i.e. how much
each weight moves the embedding. Noise is independent across samples, so summing squared
BATCH gradients is unbiased for the per-sample sum (cross terms have zero mean).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .calibration import Calibration


def pooled_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean pooling + L2 normalisation (same as verify.quality.embed)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


class TaskObjective:
    """loss(model, i, batch) for calibration batch i; build it BEFORE changing the model."""

    def __init__(self, calibration: Calibration, model: nn.Module) -> None:
        self.calibration = calibration
        self.loaded = calibration.loaded
        self.kind = self.loaded.kind
        if self.kind == "encoder" and "reference_embeddings" not in calibration.cache:
            refs = []
            model.eval()
            with torch.no_grad():
                for batch in calibration.batches():
                    h = self.loaded.output(model, batch)
                    refs.append(pooled_embedding(h.float(), batch["attention_mask"]).detach())
            calibration.cache["reference_embeddings"] = refs

    @property
    def description(self) -> str:
        if self.kind == "decoder":
            return "next-token cross-entropy on the calibration windows"
        return "distillation: 0.5*||e - e_orig||^2 of L2-normalised mean-pooled sentence embeddings (original computed before compression)"

    def loss(self, model: nn.Module, i: int, batch: dict[str, torch.Tensor],
             sample_targets: torch.Generator | None = None) -> torch.Tensor:
        """Mean loss over the batch. `sample_targets` (encoders): add N(0, I) noise to the targets (Fisher)."""
        out = self.loaded.output(model, batch).float()
        if self.kind == "decoder":
            ids = batch["input_ids"]
            return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        e = pooled_embedding(out, batch["attention_mask"])
        target = self.calibration.cache["reference_embeddings"][i].to(e.device)
        if sample_targets is not None:
            target = target + torch.randn(target.shape, generator=sample_targets).to(e.device)
        return 0.5 * ((e - target) ** 2).sum(-1).mean()
