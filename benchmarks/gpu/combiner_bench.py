"""Combiner attention vs PyTorch's scaled_dot_product_attention (flash backend), fp16, causal, SmolLM2 head
layout (9 query heads, 3 KV heads, head dim 64), batch 1, L = 1k, 2k, 4k, 8k, 16k, 32k.

Columns: median CUDA-event time of SDPA (flash; keys repeated to 9 heads as HF does for GQA) and, per
Combiner pattern, of the Triton kernels (ops/combiner_attention/kernel.py, exactly what the TensorRT
plugin's enqueue launches: span summaries + fused block attention with online softmax) and of the torch
reference (ops/combiner_attention/reference.py, eager; the standard-op graph ONNX Runtime / TensorRT get
without the plugin has the same operations), speedups over SDPA, peak allocated memory, and the kernel's
max abs error against the reference.

    python benchmarks/gpu/combiner_bench.py [--lengths 1024,...,32768] [--block 0 (= sqrt L)] [--runs 20] [--json out.json]

Expect: SDPA (flash) grows ~L^2 in time and ~L in memory; Combiner grows ~L^1.5 (fixed, axial) or
~L log L (logsparse) and wins beyond a crossover length. NOT RUN: no GPU was lent to the task that
wrote it; on a machine without CUDA it exits with a message (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cuda_median_ms  # noqa: E402

PATTERNS = ("fixed", "logsparse", "axial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--block", type=int, default=0, help="Combiner block; 0 = default_block(L) (about sqrt L)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parents[1] / "results" / "combiner_gpu.json"))
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("combiner_bench: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    from factordeploy.attention import CombinerConfig, combiner_attention, default_block
    from factordeploy.ops.combiner_attention.kernel import combiner_attention_triton

    dev, dt, h, kvh, d = "cuda", torch.float16, 9, 3, 64
    rows = []
    for L in (int(x) for x in a.lengths.split(",")):
        B = a.block or default_block(L)
        g = torch.Generator(device=dev).manual_seed(L)
        q = torch.randn(1, h, L, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, kvh, L, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, kvh, L, d, device=dev, dtype=dt, generator=g)
        row = {"L": L, "block": B}

        def sdpa():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                      is_causal=True)

        torch.cuda.reset_peak_memory_stats()
        row["sdpa_ms"] = round(cuda_median_ms(sdpa, a.runs), 3)
        row["sdpa_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        for p in PATTERNS:
            cfg = CombinerConfig(pattern=p, block=B, causal=True, heads=h, kv_heads=kvh, scale=d ** -0.5, max_len=L)
            fns = {"kernel": lambda p=p, B=B: combiner_attention_triton(q, k, v, None, p, B, True, d ** -0.5),
                   "eager": lambda cfg=cfg: combiner_attention(q, k, v, None, cfg)}
            if not a.no_compile:
                fns["compiled"] = torch.compile(lambda cfg=cfg: combiner_attention(q, k, v, None, cfg))
            try:
                err = (fns["kernel"]().float() - fns["eager"]().float()).abs().max().item()
                row[f"{p}_kernel_max_abs_err"] = round(err, 5)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
            for mode, fn in fns.items():
                try:
                    torch.cuda.reset_peak_memory_stats()
                    ms = cuda_median_ms(fn, a.runs)
                    row[f"{p}_{mode}_ms"] = round(ms, 3)
                    row[f"{p}_{mode}_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                    row[f"{p}_{mode}_speedup"] = round(row["sdpa_ms"] / ms, 3)
                except torch.cuda.OutOfMemoryError:
                    row[f"{p}_{mode}_ms"] = None
                    torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    modes = ["kernel", "eager"] + ([] if a.no_compile else ["compiled"])
    print(f"\n{'L':>6} {'B':>4} {'sdpa ms':>9} " + " ".join(f"{p[:5] + '/' + m[:4]:>12}" for p in PATTERNS for m in modes))
    for r in rows:
        cells = " ".join(f"{r.get(f'{p}_{m}_ms') or float('nan'):>12.3f}" for p in PATTERNS for m in modes)
        print(f"{r['L']:>6} {r['block']:>4} {r['sdpa_ms']:>9.3f} {cells}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": "float16", "rows": rows}, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
