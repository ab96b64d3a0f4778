"""SparseMatMul (SLTrain's S) Triton kernel vs cuBLAS dense x @ W^T, fp16, on a GPU.

For each layer shape and density delta (0.01 / 0.03 = SLTrain's default / 0.1), a random sorted
flat support of delta * out * in entries (int32 indices, as the engine stores them), random values
and activations. Token counts: decode M = 1, 2, 4, 8, 16 and prefill M = 2048, 4096, 8192.

Columns: median CUDA-event time of torch.nn.functional.linear with the dense W (cuBLAS) and of the
sparse_matmul kernel (ops/sparse_matmul/kernel.py, the exact plugin launch incl. the fp32
accumulator for fp16 outputs), speedup, and the memory roofline of the sparse op: bytes of idx +
val + x + y (+ the fp32 accumulator written twice and read once) over --hbm-gbs (H200: 4800 GB/s),
with the fraction of it the kernel reaches. What to expect: the kernel reads nnz * 6 bytes against
out * in * 2 for cuBLAS, so at decode M it should approach 2 / (6 delta) x cuBLAS's time only when
atomics and the gathers stay near the roofline; at prefill M cuBLAS's tensor cores should win (the
kernel does nnz * M scalar FMAs). The deployed SLTrain layer adds this op to two rank-r GEMMs.

    python benchmarks/gpu/sparse_matmul_bench.py [--runs 50] [--hbm-gbs 4800] [--md out.md] [--json out.json]

NOT RUN: no GPU was lent to the task that wrote it. On a machine without CUDA it exits with a
message (exit code 2) instead of failing silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import DECODE, PREFILL, cuda_median_ms, kernel_bench_args, write_table  # noqa: E402

SHAPES = {  # name: (in, out)
    "minilm.qkvo 384x384": (384, 384),
    "minilm.ffn-up 384->1536": (384, 1536),
    "smollm2.up 576->1536": (576, 1536),
    "llama.q 4096x4096": (4096, 4096),
    "llama.up 4096->11008": (4096, 11008),
}
DELTAS = (0.01, 0.03, 0.1)


def main() -> int:
    args = kernel_bench_args(__doc__.splitlines()[0], list(SHAPES), 4800.0)

    import torch

    if not torch.cuda.is_available():
        print("sparse_matmul_bench: needs a CUDA GPU (torch sees none); nothing was measured.", file=sys.stderr)
        return 2
    from factordeploy.ops.sparse_matmul.kernel import sparse_matmul
    from factordeploy.ops.sparse_matmul import reference

    dev, dt = "cuda", torch.float16
    rows = []
    for name in args.shapes:
        n_in, n_out = SHAPES[name]
        W = (torch.randn(n_out, n_in, device=dev) / n_in ** 0.5).to(dt)
        for delta in DELTAS:
            nnz = round(delta * n_in * n_out)
            idx = torch.randperm(n_in * n_out, device=dev)[:nnz].sort().values.to(torch.int32)
            val = (torch.randn(nnz, device=dev) / (delta * n_in) ** 0.5).to(dt)
            for M in DECODE + PREFILL:
                x = torch.randn(M, n_in, device=dev).to(dt)
                y = torch.empty(M, n_out, device=dev, dtype=dt)
                ref = reference(x, idx, val, in_features=n_in, out_features=n_out)[0]
                got = sparse_matmul(x, idx, val, n_out, out=y)
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
                t_dense = cuda_median_ms(lambda: torch.nn.functional.linear(x, W), args.runs)
                t_sparse = cuda_median_ms(lambda: sparse_matmul(x, idx, val, n_out, out=y), args.runs)
                nbytes = nnz * (4 + 2) + M * (n_in + n_out) * 2 + 3 * M * n_out * 4
                roof_ms = nbytes / (args.hbm_gbs * 1e9) * 1e3
                rows.append({"layer": name, "delta": delta, "nnz": nnz, "M": M,
                             "phase": "decode" if M in DECODE else "prefill",
                             "dense_ms": round(t_dense, 4), "sparse_ms": round(t_sparse, 4),
                             "speedup": round(t_dense / t_sparse, 3), "roofline_ms": round(roof_ms, 5),
                             "roofline_fraction": round(roof_ms / t_sparse, 3), "max_rel_err": round(err, 5)})
                print(" ".join(f"{k_}={v}" for k_, v in rows[-1].items()), flush=True)
    write_table(rows, [("layer", "layer"), ("delta", "delta"), ("nnz", "nnz"), ("M", "M"), ("dense cuBLAS ms", "dense_ms"),
                       ("sparse_matmul ms", "sparse_ms"), ("speedup", "speedup"), ("roofline ms", "roofline_ms"),
                       ("of roofline", "roofline_fraction"), ("rel err", "max_rel_err")], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
