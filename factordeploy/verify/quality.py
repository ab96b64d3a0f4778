"""Task quality on held-out text (the evaluation split; calibration never sees it).

Encoders: sentence embeddings (attention-masked mean pooling, L2-normalised), compared by
mean cosine with the ORIGINAL model's embeddings, plus the polarity probe (leave-one-out
nearest centroid on gensim's 200 labelled sentences). Decoders: perplexity over
non-overlapping windows of the evaluation text. References are computed once from the
original model before compression, so no second copy of the model is kept in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..models import text as textmod
from ..models.registry import LoadedModel
from ..progress import track


@dataclass(frozen=True)
class EvalConfig:
    sentences: int = 256
    max_len: int = 128
    batch: int = 32
    ppl_windows: int = 12
    ppl_len: int = 512


def embed(loaded: LoadedModel, model: nn.Module, texts: list[str], cfg: EvalConfig, device: str = "cpu") -> torch.Tensor:
    """Sentence embeddings: masked mean of last_hidden_state, L2-normalised."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), cfg.batch):
            enc = {k: v.to(device) for k, v in loaded.encode(texts[i:i + cfg.batch], cfg.max_len).items()}
            h = loaded.output(model, enc).float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
            outs.append(F.normalize(e, dim=-1).cpu())
    return torch.cat(outs)


def polarity_accuracy(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out nearest-centroid accuracy (cosine) of the labelled sentences."""
    correct = 0
    for i in range(len(labels)):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[i] = False
        cents = torch.stack([F.normalize(emb[keep & (labels == c)].mean(0), dim=0) for c in (0, 1)])
        correct += int(int((cents @ emb[i]).argmax()) == int(labels[i]))
    return correct / len(labels)


def eval_sentences(cfg: EvalConfig) -> list[str]:
    return textmod.sentences(textmod.evaluation_articles())[: cfg.sentences]


@dataclass
class EncoderReference:
    wiki: torch.Tensor
    polarity: torch.Tensor
    accuracy: float


def encoder_reference(loaded: LoadedModel, model: nn.Module, cfg: EvalConfig, device: str = "cpu") -> EncoderReference:
    pol = textmod.polarity()
    labels = torch.tensor([lab for _, lab in pol])
    p = embed(loaded, model, [t for t, _ in pol], cfg, device)
    return EncoderReference(embed(loaded, model, eval_sentences(cfg), cfg, device), p, polarity_accuracy(p, labels))


def encoder_quality(loaded: LoadedModel, model: nn.Module, ref: EncoderReference, cfg: EvalConfig,
                    device: str = "cpu") -> dict:
    pol = textmod.polarity()
    labels = torch.tensor([lab for _, lab in pol])
    w = embed(loaded, model, eval_sentences(cfg), cfg, device)
    p = embed(loaded, model, [t for t, _ in pol], cfg, device)
    return {
        "embedding_cosine_mean": round(float((w * ref.wiki).sum(-1).mean()), 5),
        "embedding_cosine_min": round(float((w * ref.wiki).sum(-1).min()), 5),
        "polarity_cosine_mean": round(float((p * ref.polarity).sum(-1).mean()), 5),
        "polarity_accuracy": round(polarity_accuracy(p, labels), 4),
        "polarity_accuracy_original": round(ref.accuracy, 4),
        "eval_sentences": len(w),
    }


def perplexity(loaded: LoadedModel, model: nn.Module, cfg: EvalConfig, device: str = "cpu",
               texts: list[str] | None = None) -> float:
    """exp(mean next-token NLL) over `ppl_windows` consecutive windows of `ppl_len` tokens of
    `texts` (default: the evaluation split; see models.text.domain_texts for other domains)."""
    stream = loaded.token_ids(texts if texts is not None else textmod.evaluation_articles())
    need = cfg.ppl_windows * cfg.ppl_len
    if len(stream) < need:
        raise ValueError(f"evaluation text has {len(stream)} tokens, need {need}")
    windows = [stream[w * cfg.ppl_len:(w + 1) * cfg.ppl_len] for w in range(cfg.ppl_windows)]
    return window_perplexity(loaded, model, windows, device)


def window_perplexity(loaded: LoadedModel, model: nn.Module, windows: list[list[int]], device: str = "cpu") -> float:
    """exp(mean next-token NLL) of `model` (torch, or engines.ort_model.OrtModel) over token windows."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in track(windows, "perplexity"):
            ids = torch.tensor([w], device=device)
            logits = loaded.output(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).float()
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            nll += float(loss)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


class QualityProbe:
    """Compute references from the original model once, then score compressed models against them."""

    def __init__(self, loaded: LoadedModel, cfg: EvalConfig | None = None, device: str = "cpu") -> None:
        self.loaded, self.cfg, self.device = loaded, cfg or EvalConfig(), device
        self.reference: dict = {}
        self._enc_ref: EncoderReference | None = None

    def capture_original(self, model: nn.Module) -> dict:
        if self.loaded.kind == "encoder":
            self._enc_ref = encoder_reference(self.loaded, model, self.cfg, self.device)
            self.reference = {"polarity_accuracy": round(self._enc_ref.accuracy, 4), "embedding_cosine_mean": 1.0}
        else:
            self.reference = {"perplexity": round(perplexity(self.loaded, model, self.cfg, self.device), 4)}
        return self.reference

    def score(self, model: nn.Module) -> dict:
        if self.loaded.kind == "encoder":
            assert self._enc_ref is not None, "capture_original first"
            return encoder_quality(self.loaded, model, self._enc_ref, self.cfg, self.device)
        ppl = perplexity(self.loaded, model, self.cfg, self.device)
        return {"perplexity": round(ppl, 4), "perplexity_original": self.reference["perplexity"],
                "windows": self.cfg.ppl_windows, "window_len": self.cfg.ppl_len}


class DomainProbe:
    """Quality on every text domain (models/text.DOMAINS): wiki in domain, news and pydoc out of domain.

    Decoders: perplexity over `ppl_windows` x `ppl_len` tokens of each domain's reported text;
    encoders: mean cosine of sentence embeddings to the original's on `sentences` sentences of
    each domain. References from the ORIGINAL model are captured once.
    """

    def __init__(self, loaded: LoadedModel, cfg: EvalConfig | None = None, device: str = "cpu",
                 domains: tuple[str, ...] = textmod.DOMAINS) -> None:
        self.loaded, self.cfg, self.device, self.domains = loaded, cfg or EvalConfig(), device, domains
        self.reference: dict[str, float] = {}
        self._emb: dict[str, torch.Tensor] = {}

    def _sentences(self, domain: str) -> list[str]:
        return textmod.sentences(textmod.reported_texts(domain))[: self.cfg.sentences]

    def _score(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for d in self.domains:
            if self.loaded.kind == "decoder":
                out[d] = round(perplexity(self.loaded, model, self.cfg, self.device, textmod.reported_texts(d)), 4)
            else:
                e = embed(self.loaded, model, self._sentences(d), self.cfg, self.device)
                if d not in self._emb:
                    self._emb[d] = e
                out[d] = round(float((e * self._emb[d]).sum(-1).mean()), 5)
        return out

    def capture_original(self, model: nn.Module) -> dict[str, float]:
        self.reference = self._score(model)
        return self.reference

    def score(self, model: nn.Module) -> dict[str, float]:
        """Decoders: perplexity per domain; encoders: mean embedding cosine to the original per domain."""
        return self._score(model)
