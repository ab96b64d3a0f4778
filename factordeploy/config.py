"""What a build is asked to do (`BuildConfig`), its engine part (`EngineConfig`), and the input checks.

Every allowed value is listed once where it is defined (methods: compress/, --backend:
engines/trt_module.BACKENDS, --precision: passes/precision.PRECISIONS, ORT lowerings: each op's
spec); `check_config` rejects bad input with one named problem and a fix before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .compress.base import get_method
from .compress.calibration import CalibrationConfig
from .compress.targets import DEFAULT_EXCLUDE
from .engines.quantize import check_mode
from .engines.tensorrt import Range3
from .engines.trt_module import BACKENDS, FULL, RTX, require
from .errors import UserError
from .passes.custom_ops import check_policies
from .passes.precision import PRECISIONS
from .recover.stage import RecoveryConfig, check_recovery_config


@dataclass(frozen=True)
class EngineConfig:
    """The TensorRT stage's typed settings (from --backend/--precision/--sparse-weights/--batch/--seq)."""

    backend: str = "auto"
    precision: str = "fp32"
    sparse_weights: bool = False
    batch: Range3 = field(default_factory=lambda: Range3(1, 8, 32))
    seq: Range3 = field(default_factory=lambda: Range3(1, 128, 512))


@dataclass
class BuildConfig:
    model: str = "minilm"
    method: str = "svd"
    ratio: float = 0.5
    out: str = "build/out"
    device: str = "cpu"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    latency_points: tuple[tuple[int, int], ...] = ((1, 128), (8, 128))
    latency_runs: int = 20
    baseline: bool = True
    evaluate: bool = True
    # TensorRT stage: backend auto|trt|trt-rtx|ort, precision of the TensorRT graph, profile ranges
    backend: str = "auto"
    precision: str = "fp32"
    sparse_weights: bool = False
    quantize: str = "none"  # none | int8: ONNX Runtime dynamic int8 of model.onnx (engines/quantize.py)
    ort_lowering: dict[str, str] = field(default_factory=dict)  # op name -> ORT lowering policy (--ort-sparse-dict ...)
    calib_cache: str | None = None  # folder of calibration statistics shared by builds of one model (deploy sweep)
    trt_batch: str = "1:8:32"
    trt_seq: str = "1:128:512"
    # Recovery stage (recover/): distillation after compression, before export; steps 0 = off
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(self.backend, self.precision, self.sparse_weights, Range3.parse(self.trt_batch, "batch"),
                            Range3.parse(self.trt_seq, "seq"))


def check_config(cfg: BuildConfig) -> None:
    """Reject bad input before any work (one named problem + fix each)."""
    if not (0.0 < cfg.ratio < 1.0):
        raise UserError(f"--ratio must be between 0 and 1 (exclusive), got {cfg.ratio}",
                        "pass e.g. --ratio 0.5 to remove half of the targeted layers' bytes")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"unknown device '{cfg.device}'", "use --device cpu or --device cuda")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU", "use --device cpu")
    get_method(cfg.method)
    check_recovery_config(cfg.recovery)
    check_policies(cfg.ort_lowering)
    check_mode(cfg.quantize)
    check_engine_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", "choose a folder path for --out")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {out} is not writable: {probe} is a file", "choose a folder you can write to")
    if not os.access(probe, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"--out {out} is not writable", "choose a folder you can write to")


def check_engine_config(cfg: BuildConfig) -> None:
    """--backend/--precision/--batch/--seq sanity, and a missing TensorRT reported before any work."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"unknown --backend '{cfg.backend}'", "use one of " + ", ".join(BACKENDS))
    if cfg.precision not in PRECISIONS:
        raise UserError(f"unknown --precision '{cfg.precision}'", "use " + ", ".join(PRECISIONS))
    if cfg.backend == "ort" and (cfg.precision != "fp32" or cfg.sparse_weights):
        raise UserError("--precision/--sparse-weights apply to TensorRT engines; the ONNX Runtime artifact is fp32",
                        "drop them, or pass --backend trt-rtx (or trt)")
    cfg.engine  # parses --batch/--seq (UserError on bad ranges)
    if cfg.backend in (FULL, RTX):
        require(cfg.backend)
