"""Triton kernels of the sparse-dictionary op: y[M, out] = (x[M, in] @ D[k, in]^T) gathered by the codes.

Two kernels, launched back to back by `sparse_dict_matmul`:
1. `dict_matmul_kernel`: z = x @ D^T (M x k), a tiled GEMM with fp32 accumulation;
2. `gather_codes_kernel`: y[m, o] = sum_t val[t, o] * z[m, idx[t, o]] (+ bias[o]): each program
   owns a (BLOCK_M x BLOCK_O) tile of y, streams the s (index, value) rows of its outputs once
   and gathers from z (M x k is small and stays in L2 for decode-size M).
Two kernels instead of one fused: a fused kernel must recompute z per output tile (k x in per
tile) or hold all k features of its rows on chip; for decode (M <= 16) z is at most 16 x k
values, so the round trip through L2 is cheap and both kernels stay simple. Memory traffic is
the roofline: D (k x in) + idx/val (s x out) + x + y, versus out x in for a dense GEMM.

One fixed configuration (no autotune): the TensorRT plugin's launch contract must be exact and
the CPU interpreter (TRITON_INTERPRET=1, set before this module is imported) cannot benchmark.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_K = 32  # atoms per GEMM tile
BLOCK_I = 32  # input features per GEMM step
BLOCK_O = 64  # outputs per gather tile
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def dict_matmul_kernel(x_ptr, d_ptr, z_ptr, M, K, IN,
                       stride_xm, stride_xi, stride_dk, stride_di, stride_zm, stride_zk,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_I: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ri = tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        ii = i0 + ri
        x = tl.load(x_ptr + rm[:, None] * stride_xm + ii[None, :] * stride_xi,
                    mask=(rm[:, None] < M) & (ii[None, :] < IN), other=0.0)
        d = tl.load(d_ptr + rk[None, :] * stride_dk + ii[:, None] * stride_di,
                    mask=(rk[None, :] < K) & (ii[:, None] < IN), other=0.0)  # D^T tile (BLOCK_I x BLOCK_K)
        if IEEE:
            acc += tl.dot(x, d, input_precision="ieee")
        else:
            acc += tl.dot(x, d)
    tl.store(z_ptr + rm[:, None] * stride_zm + rk[None, :] * stride_zk, acc,
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def gather_codes_kernel(z_ptr, idx_ptr, val_ptr, b_ptr, y_ptr, M, OUT, S,
                        stride_zm, stride_zk, stride_it, stride_io, stride_vt, stride_vo,
                        stride_ym, stride_yo,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mm = rm < M
    mo = ro < OUT
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for t in range(0, S):
        atom = tl.load(idx_ptr + t * stride_it + ro * stride_io, mask=mo, other=0).to(tl.int32)
        v = tl.load(val_ptr + t * stride_vt + ro * stride_vo, mask=mo, other=0.0).to(tl.float32)
        zg = tl.load(z_ptr + rm[:, None] * stride_zm + atom[None, :] * stride_zk,
                     mask=mm[:, None] & mo[None, :], other=0.0)
        acc += zg * v[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + ro, mask=mo, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + ro[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mo[None, :])


def sparse_dict_matmul(x, D, idx, val, bias=None, out=None, z=None):
    """y = x @ (S D)^T (+ bias) for x [..., in], D [k, in], idx/val [s, out]; torch tensors.

    `out` and `z` (an fp32 [M, k] scratch) may be given (the TensorRT plugin passes its own
    output buffer and workspace). Returns y [..., out].
    """
    import torch

    k, n_in = D.shape
    s, n_out = idx.shape
    x2 = x.reshape(-1, n_in)
    M = x2.shape[0]
    if z is None:
        z = torch.empty((M, k), device=x.device, dtype=torch.float32)
    y = out if out is not None else torch.empty((*x.shape[:-1], n_out), device=x.device, dtype=x.dtype)
    y2 = y.view(-1, n_out)
    dict_matmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(k, BLOCK_K))](
        x2, D, z, M, k, n_in, x2.stride(0), x2.stride(1), D.stride(0), D.stride(1), z.stride(0), z.stride(1),
        IEEE=int(x.dtype == torch.float32), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_I=BLOCK_I,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    b = bias if bias is not None else val  # any pointer; unused when HAS_BIAS=0
    gather_codes_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(n_out, BLOCK_O))](
        z, idx, val, b, y2, M, n_out, s, z.stride(0), z.stride(1), idx.stride(0), idx.stride(1),
        val.stride(0), val.stride(1), y2.stride(0), y2.stride(1),
        HAS_BIAS=int(bias is not None), BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y
