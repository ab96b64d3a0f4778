"""Calibration data shared by every data-aware method.

`--calib N` windows x `--calib-len L` tokens, drawn reproducibly (`--seed`) from the
calibration half of the Wikipedia text (models/text.py holds the split) or from a user
file. Per-layer input Gram matrices X^T X are accumulated in float64 with forward hooks
in one pass; memory is bounded by the layer widths (in^2 per distinct input), not N x L.
Layers that read the same tensor (q/k/v, gate/up) share one Gram matrix.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import nn

from ..progress import track
from ..models.registry import LoadedModel
from ..models import text as textmod


@dataclass(frozen=True)
class CalibrationConfig:
    n: int = 128
    length: int = 128
    seed: int = 0
    text_file: str | None = None
    batch_size: int = 8


class Calibration:
    """Lazily tokenized calibration windows plus cached statistics."""

    def __init__(self, loaded: LoadedModel, config: CalibrationConfig, device: str = "cpu") -> None:
        self.loaded = loaded
        self.config = config
        self.device = device
        self._windows: list[list[int]] | None = None
        self._grams: dict[str, torch.Tensor] = {}
        self.tokens_seen = 0

    def source(self) -> str:
        return self.config.text_file or f"gensim {textmod.WIKI_FILE} (calibration split: article i % {textmod.EVAL_EVERY} != {textmod.EVAL_EVERY - 1})"

    def windows(self) -> list[list[int]]:
        if self._windows is None:
            docs = textmod.load_user_text(self.config.text_file) if self.config.text_file else textmod.calibration_articles()
            stream = self.loaded.token_ids(docs)
            self._windows = textmod.sample_windows(stream, self.config.n, self.config.length, self.config.seed)
        return self._windows

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        w, bs = self.windows(), self.config.batch_size
        for i in range(0, len(w), bs):
            yield {k: v.to(self.device) for k, v in self.loaded.batch_from_ids(w[i:i + bs]).items()}

    def num_batches(self) -> int:
        return -(-len(self.windows()) // self.config.batch_size)

    @torch.no_grad()
    def grams(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """X^T X (float64, summed over all calibration tokens) of each named linear's input."""
        missing = [n for n in names if n not in self._grams]
        if missing:
            self._collect(model, missing)
        return {n: self._grams[n] for n in names}

    def _collect(self, model: nn.Module, names: list[str]) -> None:
        acc: dict[str, torch.Tensor] = {}
        alias: dict[str, str] = {}
        # id(x) -> (weak reference to x, first layer that read it). ids of freed tensors are
        # reused within a forward pass, so an alias is only trusted while the SAME tensor is alive.
        seen_ptr: dict[int, tuple[weakref.ref, str]] = {}
        handles = []

        def hook_for(name: str):
            def hook(_mod, inputs, _out):
                x = inputs[0]
                ref, key = seen_ptr.get(id(x), (None, name))
                if ref is None or ref() is not x:
                    seen_ptr[id(x)] = (weakref.ref(x), name)
                    key = name
                if key != name:
                    alias[name] = key
                    return
                x2 = x.reshape(-1, x.shape[-1]).float()
                g = (x2.T @ x2).to(torch.float64)
                if name in acc:
                    acc[name] += g
                else:
                    acc[name] = g
            return hook

        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook_for(n)))
        try:
            model.eval()
            for batch in track(self.batches(), "calibration statistics", total=self.num_batches()):
                seen_ptr.clear()
                self.loaded.output(model, batch)
                self.tokens_seen += int(batch["input_ids"].numel())
        finally:
            for h in handles:
                h.remove()
        for n in names:
            self._grams[n] = acc[n] if n in acc else acc[alias[n]]

    def describe(self) -> dict:
        d = asdict(self.config)
        d["source"] = self.source()
        return d
