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


DECODE = (1, 2, 4, 8, 16)  # token counts of the kernel benchmarks: decode ...
PREFILL = (2048, 4096, 8192)  # ... and prefill


def kernel_bench_args(description: str, shapes: list[str], hbm_gbs: float):
    """The arguments every kernel-vs-cuBLAS script takes (runs, roofline bandwidth, outputs, shapes)."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--hbm-gbs", type=float, default=hbm_gbs, help="HBM bandwidth for the roofline column (GB/s)")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--shapes", nargs="*", default=shapes)
    return ap.parse_args()


def write_table(rows: list[dict], columns: list[tuple[str, str]], args) -> str:
    """Markdown table of `rows` (header, key per column), printed and written to --md / --json."""
    import json

    import torch

    md = ("| " + " | ".join(h for h, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
          + "".join("| " + " | ".join(str(r[k]) for _, k in columns) + " |\n" for r in rows))
    print(md)
    gpu = torch.cuda.get_device_name()
    if args.md:
        args.md.write_text(f"GPU: {gpu}; torch {torch.__version__}\n\n" + md)
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1))
    return md
