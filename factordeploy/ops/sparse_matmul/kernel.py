"""Triton kernel for the sparse_matmul op: y[M, out] = x[M, in] @ S^T with S given by sorted flat indices.

S (out x in) is stored as nnz flat row-major indices idx (o * in + i) and values val: SLTrain's
unstructured sparse part (compress/layers.SparsePlusLowRankLinear). Each program owns a tile of
BLOCK_M tokens x BLOCK_N nonzeros: it loads the tile's indices and values once, gathers the
matching input columns of its tokens, and atomically adds val * x[m, i] into y[m, o] (an fp32
accumulator, cast to y's dtype afterwards when y is not fp32). Work and memory traffic are
proportional to nnz * M, against out * in * M for the dense GEMM: the kernel pays off when the
density is low and the GEMM is memory-bound (decode-size M); benchmarks/gpu/sparse_matmul_bench.py
measures where it stands against cuBLAS.

One fixed configuration (no autotune): the TensorRT plugin's launch contract must be exact and
the CPU interpreter (TRITON_INTERPRET=1, set before this module is imported) cannot benchmark.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_N = 128  # nonzeros per tile
NUM_WARPS = 4
NUM_STAGES = 1


@triton.jit
def sparse_matmul_kernel(x_ptr, idx_ptr, val_ptr, y_ptr, M, NNZ, IN,
                         stride_xm, stride_xi, stride_ym, stride_yo,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < NNZ
    flat = tl.load(idx_ptr + rn, mask=mn, other=0).to(tl.int64)
    v = tl.load(val_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    row = flat // IN
    col = flat - row * IN
    mask = mm[:, None] & mn[None, :]
    xg = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :] * stride_xi, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + rm[:, None] * stride_ym + row[None, :] * stride_yo, xg * v[None, :], mask=mask)


def sparse_matmul(x, idx, val, out_features: int, out=None):
    """y = x @ S^T for x [..., in], idx/val [nnz] (S out_features x in); torch tensors on one device.

    `out` may be given (the TensorRT plugin passes its output buffer). Returns y [..., out].
    """
    import torch

    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    M, nnz = x2.shape[0], idx.numel()
    y = out if out is not None else torch.empty((*x.shape[:-1], out_features), device=x.device, dtype=x.dtype)
    acc = y.view(-1, out_features) if y.dtype == torch.float32 else torch.empty(
        (M, out_features), device=x.device, dtype=torch.float32)
    acc.zero_()
    if M and nnz:
        sparse_matmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(nnz, BLOCK_N))](
            x2, idx, val, acc, M, nnz, n_in, x2.stride(0), x2.stride(1), acc.stride(0), acc.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if acc.data_ptr() != y.data_ptr():
        y.view(-1, out_features).copy_(acc)
    return y
