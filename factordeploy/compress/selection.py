"""A short whole-model check on held-out text, for choosing between whole-model compression plans.

Per-layer error predictions add up layer errors as if they were independent and as if the
calibration text were the text the model will see; neither holds exactly. `SelectionCheck` scores
a few finished candidates on windows of `models.text.selection_texts()` (the second half of the
pydoc topics: never calibrated on, never reported, the split recovery uses for keep-best) with the
model's own task loss: next-token cross-entropy (decoders), 1 - cosine of the pooled sentence
embedding to the ORIGINAL model's (encoders; the originals are computed when the check is built,
before any layer changes).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..models import text as textmod
from .objective import pooled_embedding


class SelectionCheck:
    """loss(model) on `n` held-out windows of `length` tokens; build it BEFORE changing the model."""

    def __init__(self, loaded, model: nn.Module, n: int = 8, length: int = 128, seed: int = 0,
                 batch_size: int = 4, device: str | torch.device = "cpu") -> None:
        self.loaded, self.device, self.kind = loaded, device, loaded.kind
        ids = loaded.token_ids(textmod.selection_texts())
        wins = textmod.sample_windows(ids, n, length, seed + 11)
        self.batches = [{k: v.to(device) for k, v in loaded.batch_from_ids(wins[i:i + batch_size]).items()}
                        for i in range(0, len(wins), batch_size)]
        self.refs = [self._embed(model, b) for b in self.batches] if self.kind == "encoder" else None
        self.base = self.loss(model) if self.kind == "decoder" else 0.0  # the original's cross-entropy
        self.metric = "mean embedding cosine" if self.kind == "encoder" else "perplexity ratio"

    @torch.no_grad()
    def _embed(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return pooled_embedding(self.loaded.output(model, batch).float(), batch["attention_mask"])

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        model.eval()
        tot = 0.0
        for i, b in enumerate(self.batches):
            if self.kind == "encoder":
                tot += float((1 - (self._embed(model, b) * self.refs[i]).sum(-1)).mean())
            else:
                logits = self.loaded.output(model, b).float()
                ids = b["input_ids"]
                tot += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
        return tot / len(self.batches)

    def quality(self, loss: float) -> float:
        """The loss as the report's quality: mean cosine to the original (encoders), perplexity ratio (decoders)."""
        return 1.0 - loss if self.kind == "encoder" else math.exp(loss - self.base)
