"""Keep `model.ort-optimized.onnx` only where it earns its place.

ONNX Runtime's saved optimized graph can be larger than model.onnx (SmolLM2 at --ratio 0.2:
566 MB against 453 MB: fusions store pre-transposed copies of weights) and is not always
faster. A file users might pick up by mistake is kept only when it is no larger than
model.onnx AND measured faster on this machine; the decision and both figures go in the report.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engines import ort as ortmod

MIN_SPEEDUP = 1.10  # smaller gains are within run-to-run noise on a shared 2-core CPU (measured: +-20%)


@dataclass
class OptimizedDecision:
    kept: bool
    reason: str
    model_bytes: int
    optimized_bytes: int
    model_ms: float | None = None
    optimized_ms: float | None = None
    batch: int = 1
    seq: int = 128

    def as_dict(self) -> dict:
        return asdict(self)


def decide_ort_optimized(model_path: Path, opt_path: Path, vocab: int,
                         batch: int = 1, seq: int = 128, rounds: int = 10,
                         runs_per_round: int = 3) -> OptimizedDecision:
    """Measure both files at (batch, seq), one thread; delete the optimized one unless smaller-or-equal and faster."""
    mb, ob = os.path.getsize(model_path), os.path.getsize(opt_path)
    # one intra-op thread: with ORT's default (all cores) a neighbour's job on a shared CPU swamps the difference
    m_ms, o_ms = ortmod.interleaved_latency([model_path, opt_path], batch, seq, vocab, rounds, runs_per_round, threads=1)
    if ob > mb:
        kept, reason = False, (f"removed: {ob / 1e6:.1f} MB, larger than model.onnx ({mb / 1e6:.1f} MB)"
                               f"; {o_ms:.2f} ms vs {m_ms:.2f} ms at {batch}x{seq}")
    elif m_ms / o_ms < MIN_SPEEDUP:
        kept, reason = False, (f"removed: not measurably faster ({o_ms:.2f} ms vs {m_ms:.2f} ms for model.onnx "
                               f"at {batch}x{seq}, needs {MIN_SPEEDUP:.2f}x)")
    else:
        kept, reason = True, (f"kept: {m_ms / o_ms:.2f}x faster than model.onnx ({o_ms:.2f} ms vs {m_ms:.2f} ms "
                              f"at {batch}x{seq}) and not larger ({ob / 1e6:.1f} MB vs {mb / 1e6:.1f} MB)")
    if not kept:
        Path(opt_path).unlink()
    return OptimizedDecision(kept, reason, mb, ob, m_ms, o_ms, batch, seq)
