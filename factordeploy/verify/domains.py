"""Quality against the original model on any text domain (wiki in domain; news, pydoc out of domain).

Inputs are drawn reproducibly by seed from `models.text.domain_texts(domain)`, so a folder can be
re-checked on text its build never saw. Encoders: cosine of masked-mean sentence embeddings
(test vs original, per sentence). Decoders: perplexity of both on the same token windows, their
ratio, and how often the two agree on the next token (top-1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from ..models import text as textmod
from ..models.registry import LoadedModel
from .quality import EvalConfig, embed, window_perplexity


@dataclass(frozen=True)
class DomainSample:
    domain: str = "wiki"
    seed: int = 0
    sentences: int = 128  # encoders
    windows: int = 4  # decoders
    window_len: int = 256
    max_len: int = 128


def domain_sentences(s: DomainSample) -> list[str]:
    sents = textmod.sentences(textmod.domain_texts(s.domain))
    random.Random(s.seed).shuffle(sents)
    return sents[: s.sentences]


def domain_windows(loaded: LoadedModel, s: DomainSample) -> list[list[int]]:
    return textmod.sample_windows(loaded.token_ids(textmod.domain_texts(s.domain)), s.windows, s.window_len, s.seed)


def encoder_agreement(loaded: LoadedModel, original: nn.Module, test: nn.Module, s: DomainSample,
                      reference: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """Per-sentence embedding cosine of `test` vs `original`; returns the original embeddings for reuse."""
    cfg = EvalConfig(max_len=s.max_len)
    texts = domain_sentences(s)
    ref = reference if reference is not None else embed(loaded, original, texts, cfg)
    got = embed(loaded, test, texts, cfg)
    cos = (got * ref).sum(-1)
    return {"domain": s.domain, "sentences": len(texts), "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5)}, ref


def decoder_agreement(loaded: LoadedModel, original: nn.Module, test: nn.Module, s: DomainSample,
                      reference_ppl: float | None = None) -> dict:
    windows = domain_windows(loaded, s)
    ppl_o = reference_ppl if reference_ppl is not None else window_perplexity(loaded, original, windows)
    ppl_t = window_perplexity(loaded, test, windows)
    agree, total = 0, 0
    with torch.no_grad():
        for w in windows[:2]:
            ids = torch.tensor([w])
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            a = loaded.output(original, batch).argmax(-1)
            b = loaded.output(test, batch).argmax(-1)
            agree += int((a == b).sum())
            total += a.numel()
    return {"domain": s.domain, "windows": len(windows), "window_len": s.window_len,
            "perplexity_original": round(ppl_o, 4), "perplexity": round(ppl_t, 4),
            "perplexity_ratio": round(ppl_t / ppl_o, 4), "top1_agreement": round(agree / total, 4)}
