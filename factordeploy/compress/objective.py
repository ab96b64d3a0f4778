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


def hidden_distillation(h: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """||h - t||^2 / ||t||^2 over the (unmasked) tokens: relative error of the last hidden states."""
    h, t = h.float(), t.float()
    if mask is not None:
        m = mask.unsqueeze(-1).to(h.dtype)
        return ((h - t) ** 2 * m).sum() / (t ** 2 * m).sum().clamp_min(1e-12)
    return ((h - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)


class TaskObjective:
    """loss(model, i, batch) for calibration batch i; build it BEFORE changing the model.

    `encoder_target` (encoders only): "sentence" distils the pooled sentence embedding (the
    issue's FWSVD task loss; one target vector per window), "tokens" distils every token's last
    hidden state (fine-tuning: 128x more targets per window, so it overfits the calibration set
    less - measured on MiniLM, docs/lowrank-methods.md).
    """

    def __init__(self, calibration: Calibration, model: nn.Module, encoder_target: str = "sentence") -> None:
        if encoder_target not in ("sentence", "tokens"):
            raise ValueError(f"encoder_target must be 'sentence' or 'tokens', not {encoder_target!r}")
        self.calibration = calibration
        self.loaded = calibration.loaded
        self.kind = self.loaded.kind
        self.encoder_target = encoder_target
        key = self.cache_key
        if self.kind == "encoder" and key not in calibration.cache:
            refs = []
            model.eval()
            with torch.no_grad():
                for batch in calibration.batches():
                    h = self.loaded.output(model, batch).float()
                    refs.append(h.detach() if encoder_target == "tokens"
                                else pooled_embedding(h, batch["attention_mask"]).detach())
            calibration.cache[key] = refs

    @property
    def cache_key(self) -> str:
        return "reference_embeddings" if self.encoder_target == "sentence" else "reference_hidden_states"

    @property
    def description(self) -> str:
        if self.kind == "decoder":
            return "next-token cross-entropy on the calibration windows"
        if self.encoder_target == "tokens":
            return "distillation: ||h - h_orig||^2 / ||h_orig||^2 of every token's last hidden state (original computed before compression)"
        return "distillation: 0.5*||e - e_orig||^2 of L2-normalised mean-pooled sentence embeddings (original computed before compression)"

    def loss(self, model: nn.Module, i: int, batch: dict[str, torch.Tensor],
             sample_targets: torch.Generator | None = None) -> torch.Tensor:
        """Mean loss over the batch. `sample_targets` (encoders): add N(0, I) noise to the targets (Fisher)."""
        out = self.loaded.output(model, batch).float()
        if self.kind == "decoder":
            ids = batch["input_ids"]
            return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        target = self.calibration.cache[self.cache_key][i].to(out.device)
        if self.encoder_target == "tokens":
            return hidden_distillation(out, target, batch["attention_mask"])
        e = pooled_embedding(out, batch["attention_mask"])
        if sample_targets is not None:
            target = target + torch.randn(target.shape, generator=sample_targets).to(e.device)
        return 0.5 * ((e - target) ** 2).sum(-1).mean()


def final_hidden(loaded, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden state (decoders: after the final norm, right before the LM head)."""
    if loaded.kind == "decoder":
        return model.base_model(**batch, use_cache=False).last_hidden_state
    return loaded.output(model, batch)


def logit_kd(head: nn.Module, h_s: torch.Tensor, h_t: torch.Tensor, temperature: float = 1.0,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) of the next-token distributions at temperature T, mean over tokens.

    The teacher's logits are re-made from its cached last hidden state through the SAME frozen
    LM head (never trained, never compressed), so only hidden states are stored, never
    vocabulary-sized logits. Exactly 0 when h_s == h_t.
    """
    with torch.no_grad():
        logp_t = F.log_softmax(head(h_t).float() / temperature, -1)
    logp_s = F.log_softmax(head(h_s).float() / temperature, -1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if mask is not None:
        m = mask.to(kl.dtype)
        return temperature ** 2 * (kl * m).sum() / m.sum().clamp_min(1)
    return temperature ** 2 * kl.mean()
