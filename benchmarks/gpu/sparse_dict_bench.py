"""SparseDictMatMul (CoSpaDi) Triton kernels vs cuBLAS dense x @ W^T, fp16, on a GPU.

For each layer shape and compression ratio (0.2 / 0.35 / 0.5 of the dense bytes removed), the
(k, s) pair is a candidate `cospadi` considers for that budget (compress/dictlearn.
candidate_pairs, fp16 bytes, uint8/int16 indices as stored; the kernel reads any integer width), with random D,
codes and activations. Token counts: decode M = 1, 2, 4, 8, 16 and prefill M = 2048, 4096, 8192.

Columns: median CUDA-event time of torch.nn.functional.linear (cuBLAS) and of the two Triton
kernels (ops/sparse_dict_matmul/kernel.py, the exact plugin launch), speedup, and the memory
roofline of the sparse layer: bytes of D + idx + val + x + y (+ the fp32 z scratch written and
read) over --hbm-gbs (H100 SXM: 3350 GB/s), with the fraction of it the kernel reaches.

    python benchmarks/gpu/sparse_dict_bench.py [--runs 50] [--hbm-gbs 3350] [--md out.md] [--json out.json]

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
    "minilm.ffn-down 1536->384": (1536, 384),
    "smollm2.q 576x576": (576, 576),
    "smollm2.up 576->1536": (576, 1536),
    "llama.q 4096x4096": (4096, 4096),
}
RATIOS = (0.2, 0.35, 0.5)


def _time(fn, runs: int) -> float:
    return cuda_median_ms(fn, runs)


def pick_ks(n_in: int, n_out: int, ratio: float) -> tuple[int, int] | None:
    """The middle (k, s) of cospadi's candidate list at fp16 bytes (uint8/int16 indices as stored)."""
    from factordeploy.compress.dictlearn import candidate_pairs

    cands = candidate_pairs(n_in, [n_out], int((1 - ratio) * n_in * n_out * 2), 2)
    return cands[len(cands) // 2] if cands else None


def main() -> int:
    args = kernel_bench_args(__doc__.splitlines()[0], list(SHAPES), 3350.0)

    import torch

    if not torch.cuda.is_available():
        print("sparse_dict_bench: needs a CUDA GPU (torch sees none); nothing was measured.", file=sys.stderr)
        return 2
    from factordeploy.compress.layers import index_dtype
    from factordeploy.ops.sparse_dict_matmul.kernel import sparse_dict_matmul
    from factordeploy.ops.sparse_dict_matmul import reference

    dev, dt = "cuda", torch.float16
    rows = []
    for name in args.shapes:
        n_in, n_out = SHAPES[name]
        W = (torch.randn(n_out, n_in, device=dev) / n_in ** 0.5).to(dt)
        for ratio in RATIOS:
            ks = pick_ks(n_in, n_out, ratio)
            if ks is None:
                continue
            k, s = ks
            D = (torch.randn(k, n_in, device=dev) / n_in ** 0.5).to(dt)
            # the storage index type (the kernel reads any integer width; the TensorRT plugin gets int32)
            idx = torch.argsort(torch.rand(n_out, k, device=dev), dim=1)[:, :s].T.contiguous().to(index_dtype(k))
            val = (torch.randn(s, n_out, device=dev) / s ** 0.5).to(dt)
            for M in DECODE + PREFILL:
                x = torch.randn(M, n_in, device=dev).to(dt)
                y = torch.empty(M, n_out, device=dev, dtype=dt)
                z = torch.empty(M, k, device=dev, dtype=torch.float32)
                ref = reference(x, D, idx, val)[0]
                got = sparse_dict_matmul(x, D, idx, val, out=y, z=z)
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
                t_dense = _time(lambda: torch.nn.functional.linear(x, W), args.runs)
                t_sparse = _time(lambda: sparse_dict_matmul(x, D, idx, val, out=y, z=z), args.runs)
                nbytes = (k * n_in + s * n_out) * 2 + idx.numel() * idx.element_size() + M * (n_in + n_out) * 2 + 2 * M * k * 4
                roof_ms = nbytes / (args.hbm_gbs * 1e9) * 1e3
                dense_roof_ms = (n_in * n_out + M * (n_in + n_out)) * 2 / (args.hbm_gbs * 1e9) * 1e3
                rows.append({"layer": name, "ratio": ratio, "k": k, "s": s, "M": M,
                             "phase": "decode" if M in DECODE else "prefill",
                             "dense_ms": round(t_dense, 4), "sparse_dict_ms": round(t_sparse, 4),
                             "speedup": round(t_dense / t_sparse, 3), "roofline_ms": round(roof_ms, 5),
                             "roofline_fraction": round(roof_ms / t_sparse, 3),
                             "dense_roofline_ms": round(dense_roof_ms, 5), "max_rel_err": round(err, 5)})
                print(" ".join(f"{k_}={v}" for k_, v in rows[-1].items()), flush=True)
    write_table(rows, [("layer", "layer"), ("ratio", "ratio"), ("k", "k"), ("s", "s"), ("M", "M"),
                       ("dense cuBLAS ms", "dense_ms"), ("sparse-dict ms", "sparse_dict_ms"), ("speedup", "speedup"),
                       ("roofline ms", "roofline_ms"), ("of roofline", "roofline_fraction"), ("rel err", "max_rel_err")], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
