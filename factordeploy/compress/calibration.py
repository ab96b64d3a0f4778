"""Calibration data shared by every data-aware method.

`--calib N` windows x `--calib-len L` tokens, drawn reproducibly (`--seed`) from the
calibration half of the Wikipedia text (models/text.py holds the split) or from a user
file. Per-layer input Gram matrices X^T X are accumulated in float64 with forward hooks
in one pass; memory is bounded by the layer widths (in^2 float64 per distinct input, e.g.
18.9 MB for a 1536-wide input), plus one batch of activations - never N x L rows.
Layers that read the same tensor (q/k/v, gate/up) share one Gram matrix.

A Calibration belongs to one ORIGINAL model: statistics (grams, Fisher, reference
embeddings) are cached on it and reused by every method/variant compressing a fresh copy
of that model (the benchmark relies on this to collect them once).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import UserError
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
        self.cache: dict[str, Any] = {}  # derived statistics (Fisher, reference embeddings), see fisher.py
        self.tokens_seen = 0
        self._store: Path | None = None
        self._loaded_from_store: tuple[int, int] = (0, 0)  # (grams, cache entries) read from the store

    # -- persistent statistics, so separate builds of one model (a sweep's cells) collect them once --

    def store_key(self) -> str:
        """Identity of these statistics: the original model (source + weight files) and the calibration config."""
        src = Path(self.loaded.source)
        files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in src.glob("*")
                       if p.suffix in (".safetensors", ".bin", ".gguf", ".json")) if src.is_dir() else []
        ident = {"model": self.loaded.name, "source": str(src), "files": files,
                 "config": {k: v for k, v in asdict(self.config).items() if k != "batch_size"},
                 "batch_size": self.config.batch_size}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def attach_store(self, folder: str | Path) -> None:
        """Read statistics saved by an earlier build with the same key; `save_store` adds new ones."""
        self._store = Path(folder) / f"calib-{self.store_key()}.pt"
        if self._store.is_file():
            try:  # the safe loader only: a crafted file in a shared cache folder cannot run code
                saved = torch.load(self._store, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged or crafted cache file is the user's folder
                raise UserError(f"calibration cache {self._store} cannot be read safely ({type(e).__name__})",
                                "delete that file (the statistics are collected again)") from None
            self._grams.update(saved["grams"])
            self.cache.update(saved["cache"])
            self._loaded_from_store = (len(saved["grams"]), len(saved["cache"]))

    def save_store(self) -> None:
        if self._store is None or (len(self._grams), len(self.cache)) == self._loaded_from_store:
            return
        self._store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._store.with_name(self._store.name + f".tmp{os.getpid()}")
        torch.save({"grams": self._grams, "cache": self.cache}, tmp)
        os.replace(tmp, self._store)

    def source(self) -> str:
        return self.config.text_file or f"gensim {textmod.WIKI_FILE} (calibration split: article i % {textmod.EVAL_EVERY} != {textmod.EVAL_EVERY - 1})"

    def windows(self) -> list[list[int]]:
        if self._windows is None:
            user = self.config.text_file
            docs = textmod.read_text_input(user, "--calib-data") if user else textmod.calibration_articles()
            stream = self.loaded.token_ids(docs)
            if user:
                textmod.check_token_budget(len(stream), self.config.n, self.config.length, f"--calib-data {user}")
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
        with GramHooks({n: model.get_submodule(n) for n in names}) as hooks:
            model.eval()
            for batch in track(self.batches(), "calibration statistics (X^T X, float64)", total=self.num_batches()):
                self.loaded.output(model, batch)
                hooks.next_batch()
                self.tokens_seen += int(batch["input_ids"].numel())
        self._grams.update(hooks.grams(names))

    def describe(self) -> dict:
        d = asdict(self.config)
        d["source"] = self.source()
        if self._store is not None:
            d["stats_store"] = {"file": str(self._store), "grams_reused": self._loaded_from_store[0],
                                "cache_entries_reused": self._loaded_from_store[1]}
        return d


class GramHooks:
    """Forward hooks accumulating X^T X (float64) of each named module's input, as a context manager.

    Layers reading the same tensor are hooked back to back (q, k, v; gate, up) and share ONE Gram
    tensor (methods recognise same-input families by identity). Holding a reference to the last
    input keeps its id from being reused by a later tensor; call `next_batch()` after each forward.
    Used by `Calibration` (whole-model passes) and `compress/sequential.py` (one block at a time).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.acc: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self._last: list = [None, None]  # [tensor, layer name that owns its Gram]
        self._handles: list = []

    def _hook_for(self, name: str):
        def hook(_mod, inputs, _out):
            x = inputs[0]
            if self._last[0] is x:
                self.alias[name] = self._last[1]
                return
            self._last[0], self._last[1] = x, name
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            g = x2.T @ x2
            if name in self.acc:
                self.acc[name] += g
            else:
                self.acc[name] = g
        return hook

    def __enter__(self) -> "GramHooks":
        self._handles = [m.register_forward_hook(self._hook_for(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.next_batch()

    def next_batch(self) -> None:
        self._last[0] = self._last[1] = None

    def grams(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.acc[n] if n in self.acc else self.acc[self.alias[n]] for n in names}
