"""Library form of the build's first half: load -> reference quality -> compress a copy -> score.

`deploy build` (build.py) does the same steps plus export/passes/engines; benchmarks use
this to compare many methods on one loaded model without exporting, reusing one
Calibration (grams, Fisher, reference embeddings of the ORIGINAL model) across variants.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .compress.base import CompressContext, CompressResult, get_method, method_options  # noqa: F401 (re-export)
from .compress.calibration import Calibration, CalibrationConfig
from .compress.targets import DEFAULT_EXCLUDE, find_targets
from .models.registry import LoadedModel, load_model
from .verify.quality import EvalConfig, QualityProbe


@dataclass
class Session:
    """One original model, its quality reference and its calibration statistics."""

    loaded: LoadedModel
    probe: QualityProbe
    calibration: Calibration
    targets: list[str]
    device: str = "cpu"
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def open_session(model: str, calib: CalibrationConfig, device: str = "cpu", seed: int = 0,
                 eval_cfg: EvalConfig | None = None, include: tuple[str, ...] = ("*",),
                 exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> Session:
    t0 = time.perf_counter()
    loaded = load_model(model)
    loaded.model.to(device)
    targets = find_targets(loaded.model, include, exclude)
    t1 = time.perf_counter()
    probe = QualityProbe(loaded, eval_cfg, device=device)
    probe.capture_original(loaded.model)
    t2 = time.perf_counter()
    return Session(loaded, probe, Calibration(loaded, calib, device), targets, device, seed,
                   {"load": round(t1 - t0, 2), "reference": round(t2 - t1, 2)})


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


def compress_copy(session: Session, method: str, ratio: float, options: dict[str, Any] | None = None
                  ) -> tuple[torch.nn.Module, CompressResult, float]:
    """Compress a deep copy of the session's original model (the original is never touched)."""
    m = get_method(method)
    opts = method_options(method, options)
    model = copy.deepcopy(session.loaded.model)
    ctx = CompressContext(ratio=ratio, device=session.device, seed=session.seed, options=opts,
                          calibration=session.calibration if m.uses_calibration(opts) else None)
    torch.manual_seed(session.seed)
    t0 = time.perf_counter()
    result = m.compress(model, list(session.targets), ctx)
    model.eval()
    return model, result, time.perf_counter() - t0


def compress_and_score(session: Session, method: str, ratio: float, options: dict[str, Any] | None = None
                       ) -> VariantResult:
    model, result, dt = compress_copy(session, method, ratio, options)
    t0 = time.perf_counter()
    quality = session.probe.score(model)
    ds = time.perf_counter() - t0
    del model
    return VariantResult(method, ratio, method_options(method, options), quality, result, dt, ds)
