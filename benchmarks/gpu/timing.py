"""CUDA-event timing shared by the GPU benchmark scripts (run them as `python benchmarks/gpu/X.py`)."""

from __future__ import annotations

import statistics
from typing import Callable


def cuda_median_ms(fn: Callable[[], object], runs: int, warmup: int = 5, iters: int = 1) -> float:
    """Median over `runs` of the CUDA-event time of `iters` back-to-back calls, divided by `iters` (ms)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / iters)
    return statistics.median(times)
