"""GPU micro-benchmark: dense vs 2:4 semi-structured vs DenseSparseLinear, fp16, BERT and Llama shapes.

Why this exists: on the lent H100, torch's `to_sparse_semi_structured` measured 0.76-1.40 ms per
linear at every shape, slower than dense everywhere, with a floor near 0.76 ms - an overhead, not
the math. This script separates the candidate causes, one variant per hypothesis:

  dense            F.linear(x, W) (cuBLAS)                                          - the reference
  s24_recompress   to_sparse_semi_structured(W) INSIDE the timed call, then F.linear  - H1: compressing per call
  s24_cslt         W compressed once (cuSPARSELt subclass), F.linear(x, Ws)          - H2: cuSPARSELt plan per call
  s24_cslt_direct  torch._cslt_compress once + torch._cslt_sparse_mm called directly with the
                   alg id from torch._cslt_sparse_mm_search found once and M padded once - H5: the
                   subclass dispatch (torch >= 2.12 routes F.linear through a Python torch.library
                   custom op `semi_structured::cusparselt_mm` that pads, transposes and narrows per call)
  s24_cutlass      SparseSemiStructuredTensor._FORCE_CUTLASS = True, compressed once  - H3: the backend
  s24_graph        s24_cslt captured in a CUDA graph (removes all CPU/Python dispatch)  - H4: Python/dispatch cost
  densesparse      DenseSparseLinear: F.linear(F.linear(x, S_s), D), k at 50% stored bytes, S 2:4
  densesparse_dense the same two GEMMs with S stored dense (what 2:4 should beat)

Each is timed two ways: GPU time (CUDA events around `--iters` back-to-back calls, median of
`--repeats`) and host time per call (perf_counter without synchronising, showing launch/dispatch
cost). A per-call overhead shows up as a host time near the GPU time for small shapes.

Shapes: BERT-base (768->768, 768->3072, 3072->768) and Llama-2-7B (4096->4096, 4096->11008,
11008->4096); tokens M = 1 and 16 (decode), 512 and 4096 (prefill). All fp16.

Run (needs a CUDA GPU with 2:4 support, sm80+; NOT run by the issue-6 session, which had no GPU):
    python benchmarks/gpu/sparse24_bench.py --out results/sparse24_bench.md
    python benchmarks/gpu/sparse24_bench.py --quick        # 2 shapes x 2 M for a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cuda_median_ms  # noqa: E402
from torch.nn import functional as F

BERT = [("bert.qkvo", 768, 768), ("bert.ffn_up", 768, 3072), ("bert.ffn_down", 3072, 768)]
LLAMA = [("llama.attn", 4096, 4096), ("llama.ffn_up", 4096, 11008), ("llama.ffn_down", 11008, 4096)]
TOKENS = [("decode", 1), ("decode", 16), ("prefill", 512), ("prefill", 4096)]


@dataclass
class Row:
    shape: str
    in_f: int
    out_f: int
    phase: str
    m: int
    variant: str
    gpu_ms: float
    host_us: float
    max_abs_err: float
    note: str = ""


def project_24(W: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 along the input dim (same rule as compress/layers.py)."""
    o, i = W.shape
    g = W.reshape(o, i // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * m).reshape(o, i)


def gpu_time(fn: Callable[[], torch.Tensor], iters: int, repeats: int) -> float:
    """Median over `repeats` of (CUDA-event time of `iters` calls) / iters, in ms."""
    return cuda_median_ms(fn, repeats, iters=iters)


def host_time(fn: Callable[[], torch.Tensor], iters: int) -> float:
    """Mean host-side microseconds per call without synchronising (launch + dispatch cost)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def cuda_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def replay() -> torch.Tensor:
        g.replay()
        return out
    return replay


def variants(W: torch.Tensor, x: torch.Tensor, k: int) -> dict[str, tuple[Callable[[], torch.Tensor], str]]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    out: dict[str, tuple[Callable[[], torch.Tensor], str]] = {}
    out["dense"] = (lambda: F.linear(x, W), "")
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    out["s24_recompress"] = (lambda: F.linear(x, to_sparse_semi_structured(W)), "compress inside the call")
    Ws = to_sparse_semi_structured(W)
    out["s24_cslt"] = (lambda: F.linear(x, Ws), type(Ws).__name__)
    if hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm"):
        # Bypass the tensor subclass (and, in torch >= 2.12, its Python torch.library custom op
        # `semi_structured::cusparselt_mm`): compress once, pad M once, search the algorithm once.
        Wc = torch._cslt_compress(W)
        m = x.shape[0]
        xp = F.pad(x, (0, 0, 0, (-m) % 16)) if m % 16 else x
        xt = xp.t()
        alg, note = 0, "alg 0"
        if hasattr(torch, "_cslt_sparse_mm_search"):
            try:
                alg = int(torch._cslt_sparse_mm_search(Wc, xt, transpose_result=True))
                note = f"alg {alg} (searched once)"
            except Exception as e:  # pragma: no cover - depends on the torch build
                note = f"search failed: {type(e).__name__}"
        note += f", M padded {m}->{xp.shape[0]}" if xp is not x else ""
        # W (out x in) sparse @ x^T (in x M) -> (out x M); transpose_result gives (M x out).
        out["s24_cslt_direct"] = (lambda: torch._cslt_sparse_mm(Wc, xt, transpose_result=True, alg_id=alg)[:m], note)
    try:
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        Wcut = to_sparse_semi_structured(W)
        out["s24_cutlass"] = (lambda: F.linear(x, Wcut), type(Wcut).__name__)
    except Exception as e:  # pragma: no cover
        print(f"  CUTLASS path unavailable: {e}", file=sys.stderr)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
    try:
        out["s24_graph"] = (cuda_graph(lambda: F.linear(x, Ws)), "CUDA graph of s24_cslt")
    except Exception as e:  # pragma: no cover
        print(f"  CUDA graph capture failed: {e}", file=sys.stderr)
    # DenseSparseLinear at k: D (out x k) dense, S (k x in) 2:4.
    o, i = W.shape
    S = project_24(torch.randn(k, i, device=W.device, dtype=W.dtype) / i ** 0.5)
    D = torch.randn(o, k, device=W.device, dtype=W.dtype) / k ** 0.5
    Ss = to_sparse_semi_structured(S)
    out["densesparse"] = (lambda: F.linear(F.linear(x, Ss), D), f"k={k}")
    out["densesparse_dense"] = (lambda: F.linear(F.linear(x, S), D), f"k={k}, S dense")
    return out


def dsformer_k(out_f: int, in_f: int, ratio: float = 0.5, elem: int = 2) -> int:
    """Largest k with D + 2:4 S (values + 2-bit metadata) within (1 - ratio) of the dense bytes; multiple of 16."""
    budget = (1 - ratio) * out_f * in_f * elem
    k = int(budget / (out_f * elem + in_f * (elem / 2 + 0.125)))
    return max(16, k // 16 * 16)


def run(shapes, tokens, iters: int, repeats: int) -> list[Row]:
    torch.manual_seed(0)
    rows: list[Row] = []
    for name, i, o in shapes:
        W = project_24(torch.randn(o, i, device="cuda", dtype=torch.float16) / i ** 0.5)
        k = dsformer_k(o, i)
        for phase, m in tokens:
            x = torch.randn(m, i, device="cuda", dtype=torch.float16)
            ref = F.linear(x, W).float()
            for vname, (fn, note) in variants(W, x, k).items():
                try:
                    err = float((fn().float() - ref).abs().max()) if not vname.startswith("densesparse") else float("nan")
                    g = gpu_time(fn, iters, repeats)
                    h = host_time(fn, iters)
                except Exception as e:
                    rows.append(Row(name, i, o, phase, m, vname, float("nan"), float("nan"), float("nan"),
                                    f"failed: {type(e).__name__}: {str(e)[:80]}"))
                    continue
                rows.append(Row(name, i, o, phase, m, vname, round(g, 4), round(h, 1), err, note))
                print(f"{name:14s} {phase:7s} M={m:<5d} {vname:18s} gpu {g:8.4f} ms  host {h:8.1f} us  {note}", flush=True)
    return rows


def markdown(rows: list[Row], meta: dict) -> str:
    lines = ["# 2:4 semi-structured vs dense (fp16)", "", "```", json.dumps(meta, indent=1), "```", "",
             "| shape | in->out | phase | M | variant | GPU ms | host us/call | vs dense | note |",
             "|---|---|---|---:|---|---:|---:|---:|---|"]
    dense = {(r.shape, r.m): r.gpu_ms for r in rows if r.variant == "dense"}
    for r in rows:
        d = dense.get((r.shape, r.m))
        sp = f"{d / r.gpu_ms:.2f}x" if d and r.gpu_ms == r.gpu_ms and r.gpu_ms > 0 else ""
        lines.append(f"| {r.shape} | {r.in_f}->{r.out_f} | {r.phase} | {r.m} | {r.variant} | {r.gpu_ms} | {r.host_us} | {sp} | {r.note} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/sparse24_bench.md")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="one BERT and one Llama shape, M in {16, 512}")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sparse24_bench: needs a CUDA GPU (sm80+ for 2:4 sparse tensor cores); none visible, nothing run.",
              file=sys.stderr)
        return 2
    shapes, tokens = BERT + LLAMA, TOKENS
    if args.quick:
        shapes, tokens = [BERT[1], LLAMA[0]], [("decode", 16), ("prefill", 512)]
    meta = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cusparselt": bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available()),
            "iters": args.iters, "repeats": args.repeats}
    print(json.dumps(meta), flush=True)
    rows = run(shapes, tokens, args.iters, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
