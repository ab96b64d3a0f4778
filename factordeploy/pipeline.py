"""The build's first stages as a library, for benchmarks: one original model, many compressed variants.

Runs the same stage functions as `deploy build` (stages.py: load -> reference -> compress ->
evaluate), so the benchmarks and the build cannot drift apart. A `Session` holds the loaded
original, its quality reference and one Calibration (grams, Fisher, reference activations of the
ORIGINAL model) that every variant reuses; each variant compresses a deep copy.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import stages as st
from .compress.base import CompressResult, get_method, method_options  # noqa: F401 (re-export)
from .compress.calibration import Calibration, CalibrationConfig
from .compress.targets import DEFAULT_EXCLUDE
from .config import BuildConfig
from .recover.blockwise import BlockwiseConfig
from .models.registry import LoadedModel
from .verify.quality import EvalConfig, QualityProbe


@dataclass
class Session:
    """One original model, its quality reference and its calibration statistics."""

    state: st.BuildState
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def loaded(self) -> LoadedModel:
        return self.state.loaded

    @property
    def probe(self) -> QualityProbe:
        return self.state.probe

    @property
    def calibration(self) -> Calibration:
        return self.state.calibration

    @property
    def targets(self) -> list[str]:
        return self.state.targets


def open_session(model: str, calib: CalibrationConfig, device: str = "cpu", seed: int = 0,
                 eval_cfg: EvalConfig | None = None, include: tuple[str, ...] = ("*",),
                 exclude: tuple[str, ...] = DEFAULT_EXCLUDE, evaluate: bool = True) -> Session:
    """`evaluate=False`: no quality reference of the original (benchmarks that score artifacts themselves)."""
    cfg = BuildConfig(model=model, device=device, seed=seed, calib=calib, include=include, exclude=exclude,
                      evaluate=evaluate)
    state = st.BuildState(cfg, Path(tempfile.gettempdir()), eval_cfg=eval_cfg)
    t0 = time.perf_counter()
    st.load(state)
    t1 = time.perf_counter()
    st.reference(state)
    t2 = time.perf_counter()
    state.calibration = Calibration(state.loaded, calib, device)  # shared by every variant that uses it
    return Session(state, {"load": round(t1 - t0, 2), "reference": round(t2 - t1, 2)})


@dataclass
class VariantResult:
    method: str
    ratio: float
    options: dict[str, Any]
    quality: dict
    result: CompressResult
    compress_s: float
    score_s: float

    @property
    def reduction(self) -> float:
        return 1 - self.result.bytes_after / self.result.bytes_before


def compress_copy(session: Session, method: str, ratio: float, options: dict[str, Any] | None = None,
                  blockwise: BlockwiseConfig | None = None,
                  build: dict[str, Any] | None = None) -> tuple[torch.nn.Module, CompressResult, float]:
    """The compress stage on a deep copy of the session's original model (the original is never touched);
    `blockwise`: --calib-mode / --reconstruct-* (default: the build's defaults); `build`: other BuildConfig
    fields the method reads (e.g. {"quant_algo": "gptq"} for quant-lowrank)."""
    v = session.state.variant(method, ratio, method_options(method, options))
    if blockwise is not None:
        v.cfg = dataclasses.replace(v.cfg, blockwise=blockwise)
    if build:
        v.cfg = dataclasses.replace(v.cfg, **build)
    torch.manual_seed(session.state.cfg.seed)
    t0 = time.perf_counter()
    st.compress(v)
    return v.model, v.result, time.perf_counter() - t0


def compress_and_score(session: Session, method: str, ratio: float, options: dict[str, Any] | None = None,
                       blockwise: BlockwiseConfig | None = None) -> VariantResult:
    model, result, dt = compress_copy(session, method, ratio, options, blockwise)
    t0 = time.perf_counter()
    quality = session.probe.score(model)
    ds = time.perf_counter() - t0
    del model
    return VariantResult(method, ratio, method_options(method, options), quality, result, dt, ds)
