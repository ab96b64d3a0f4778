"""What a build is asked to do (`BuildConfig`), its engine part (`EngineConfig`), and the input checks.

Every allowed value is listed once where it is defined (methods: compress/, --backend:
engines/trt_module.BACKENDS, --precision: passes/precision.PRECISIONS, ORT lowerings: each op's
spec); `check_config` rejects bad input with one named problem and a fix before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .attention import AttentionConfig, check_attention, default_block
from .compress.base import get_method
from .compress.calibration import CalibrationConfig
from .compress.quant import ALGOS, TRT_BITS
from .compress.quantize import WEIGHT_ONLY
from .compress.targets import DEFAULT_EXCLUDE
from .engines.quantize import check_mode
from .engines.tensorrt import Range3
from .engines.trt_module import BACKENDS, FULL, RTX, require
from .errors import UserError
from .models.shape import ModelShape
from .models.text import read_text_input
from .outdir import check_out, check_writable_folder
from .ranges import NARROWEST, POSITIONS, ModelLimit
from .passes.custom_ops import check_policies
from .passes.precision import PRECISIONS
from .recover.stage import RecoveryConfig, check_recovery_config
from .recover.blockwise import BlockwiseConfig, check_blockwise


DEFAULT_SEQ = "1:128:512"


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
    overwrite: bool = False  # replace an --out that deploy did not write (outdir.check_out)
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
    quantize: str = "none"  # none | w8 | w4 | w2 (weight-only, every stored factor: compress/quantize.py) | int8 (ORT dynamic)
    quant_block: int = 32  # codes per scale along K (weight-only and quant-lowrank)
    quant_sym: bool = True  # symmetric codes (TensorRT takes symmetric only)
    quant_algo: str = "rtn"  # rtn (ONNX Runtime's own quantizer, reproduced) | gptq (calibration output error)
    quantize_head: bool = False  # also the LM head (a tied head gets its own codes) and the token-embedding table
    embedding_bits: int = 8  # the table's codes with quantize_head: 8 (one scale per row) or 4 (quant_block blocks)
    ort_lowering: dict[str, str] = field(default_factory=dict)  # op name -> ORT lowering policy (--ort-sparse-dict ...)
    calib_cache: str | None = None  # folder of calibration statistics shared by builds of one model (deploy sweep)
    trt_batch: str = "1:8:32"
    trt_seq: str = DEFAULT_SEQ  # a --seq max beyond the model's positions is refused unless it is this default
    # structured attention (attention/): full | combiner-fixed | combiner-logsparse | combiner-axial
    attention: str = "full"
    attention_block: int = 0  # 0 = about sqrt of the --seq opt length

    def attention_config(self, model: Any = None) -> AttentionConfig:
        """--attention/--attention-block against the profile's lengths: opt sets the default block; the maximum
        is the --seq max, capped by the model's position table once the model is loaded."""
        seq = Range3.parse(self.trt_seq, "seq")
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_len = min(seq.max, int(positions)) if positions else seq.max
        return AttentionConfig(kind=self.attention, block=self.attention_block or default_block(seq.opt),
                               max_len=max_len)
    # Recovery stage (recover/): distillation after compression, before export; steps 0 = off
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    # Block-wise compression (compress/sequential.py, recover/blockwise.py): --calib-mode, --reconstruct-*
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)

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
    check_blockwise(cfg.blockwise, get_method(cfg.method), dict(cfg.options))
    check_recovery_config(cfg.recovery)
    check_policies(cfg.ort_lowering)
    check_mode(cfg.quantize)
    check_quant_config(cfg)
    check_engine_config(cfg)
    check_attention(cfg.attention_config())
    if cfg.calib_cache:
        check_writable_folder(cfg.calib_cache, "--calib-cache")
    if cfg.calib.text_file is not None:
        read_text_input(cfg.calib.text_file, "--calib-data")
    check_out(cfg.out, cfg.overwrite, input_paths(cfg))


# The build's options whose upper bound depends on the model (methods declare theirs on MethodOption.limit):
# flag -> (limit, the value in a BuildConfig). One table, read by check_model_limits and by the generated
# tests (tests/test_option_ranges.py tries the first value past each bound on a tiny model).
MODEL_LIMITS: dict[str, tuple[ModelLimit, Callable[["BuildConfig"], Any]]] = {
    "--calib-len": (POSITIONS, lambda c: c.calib.length),
    "--seq": (POSITIONS, lambda c: None if c.trt_seq == DEFAULT_SEQ else Range3.parse(c.trt_seq, "seq").max),
    "--adapter-rank": (NARROWEST, lambda c: c.recovery.rank),
    "--attention-block": (POSITIONS, lambda c: c.attention_block if c.attention != "full" else None),
}


def check_model_limits(cfg: BuildConfig, shape: ModelShape) -> None:
    """The option ranges that depend on the model, checked once its config.json is read and before any
    weight is loaded (models.registry.load_model's on_config hook, from stages.load): MODEL_LIMITS (sequence
    lengths vs its position table, the adapter rank vs its widths, the Combiner block), the Combiner
    settings at the model's length, and the method's own `validate(options, shape)`."""
    for flag, (limit, value) in MODEL_LIMITS.items():
        shown = "--seq max" if flag == "--seq" else flag  # --seq is min:opt:max; its max is bounded
        limit.check(shown, value(cfg), shape, fix=f"pass {shown} <= {limit.bound(shape)}" if flag != "--seq" else
                    f"pass --seq with a max <= {limit.bound(shape)}, e.g. --seq 1:{min(32, limit.bound(shape))}:{limit.bound(shape)}")
    pos = shape.max_positions
    if cfg.attention != "full":
        a = cfg.attention_config()
        check_attention(AttentionConfig(a.kind, a.block, min(a.max_len, pos) if pos else a.max_len))
    get_method(cfg.method).validate(dict(cfg.options), shape)


def input_paths(cfg: BuildConfig) -> list[str]:
    """Everything the build reads or resumes from; --out may never contain one of them."""
    paths = [cfg.model] if Path(cfg.model).exists() else []
    if cfg.calib.text_file:
        paths.append(cfg.calib.text_file)
    paths += [v for k, v in cfg.options.items()  # checkpoint folders, data files (existing or to be written)
              if isinstance(v, str) and v and (Path(v).exists() or k.endswith(("checkpoint", "data", "dir", "file", "path")))]
    return paths


def uses_quant_settings(cfg: BuildConfig) -> bool:
    return cfg.quantize in WEIGHT_ONLY or cfg.method in ("quant-lowrank", "auto")


def check_quant_config(cfg: BuildConfig) -> None:
    """--quant-block / --quant-asym / --quant-algo / --quantize-head, and what TensorRT can take, before any work."""
    b = cfg.quant_block
    if not isinstance(b, int) or b < 16 or b > 4096 or b & (b - 1):
        raise UserError(f"--quant-block {b} is not supported",
                        "use a power of two from 16 to 4096 (32 is ONNX Runtime's default; K is padded to whole blocks)")
    if cfg.quant_algo not in ALGOS:
        raise UserError(f"unknown --quant-algo '{cfg.quant_algo}'", "use " + " or ".join(ALGOS))
    quant = uses_quant_settings(cfg)
    if not quant and (cfg.quantize_head or not cfg.quant_sym or cfg.quant_algo != "rtn" or cfg.quant_block != 32):
        raise UserError("--quant-block/--quant-asym/--quant-algo/--quantize-head apply to weight-only quantization",
                        "add --quantize w8 or --quantize w4 (or use --method quant-lowrank)")
    if cfg.embedding_bits not in (4, 8) or (cfg.embedding_bits != 8 and not cfg.quantize_head):
        raise UserError(f"--embedding-bits {cfg.embedding_bits} needs --quantize-head (the table is stored at 8 or 4 bits)",
                        "add --quantize-head, or drop --embedding-bits")
    if cfg.backend in (FULL, RTX) and quant:
        bits = WEIGHT_ONLY.get(cfg.quantize) or int(cfg.options.get("bits") or 4)
        if bits not in TRT_BITS or (cfg.method == "quant-lowrank" and int(cfg.options.get("bits") or 4) not in TRT_BITS):
            raise UserError(f"TensorRT's QDQ weights are 4 or 8 bits; {bits}-bit codes run on ONNX Runtime only",
                            "use --quantize w4/w8 (--bits 4/8), or --backend ort")
        if not cfg.quant_sym:
            raise UserError("TensorRT's QDQ weights are symmetric (its parser refuses unsigned codes with zero points)",
                            "drop --quant-asym, or use --backend ort")
    if cfg.backend in (FULL, RTX) and cfg.options.get("budget_latency"):
        raise UserError("--budget-latency is measured on ONNX Runtime's CPU kernels; TensorRT's need its GPU",
                        "build with --backend ort, or give --budget (bytes) alone for a TensorRT engine")


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
