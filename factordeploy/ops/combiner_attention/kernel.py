"""Triton kernels of Combiner attention (reference.py is the ground truth).

Two kernels:
1. `span_summary_kernel`: one program per (batch x query head, span); streams the span's tokens twice:
   max-pooled query and key (valid tokens only), then the span value = online-softmax attention of the
   pooled query over the span. Spans are given as token ranges (fixed: the blocks; logsparse: every node
   of every tree level), so one kernel serves both.
2. `combiner_fwd_kernel`: one program per (batch x query head, query block): direct attention to the
   own block, then the spans folded into the SAME online softmax (running max, sum, accumulator):
   fixed - span tiles through tl.dot; logsparse - one sibling per tree level; axial - every other row
   through the cell in the query's column (key = that cell's key, value = that cell's row attention,
   which this same kernel computes first with no spans and no causal mask).
No L x L or L x nb tensor is ever written; memory is O(L d + spans d). Inputs are contiguous
[b, heads, L, d] (q) and [b, kv_heads, L, d] (k, v), key_mask [b, L] (1 = real token), d a power of two.
One fixed configuration (no autotune); TRITON_INTERPRET=1 must be set before import to run on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG = -1.0e30
BLOCK_T = 32      # tokens per step in the summary kernel
BLOCK_S = 16      # spans per step of the fixed pattern
NUM_WARPS = 4


@triton.jit
def _bases(q_ptr, k_ptr, v_ptr, L, H, GROUP, D: tl.constexpr):
    """This program's (batch x query head) row: its batch index and q / grouped k / v base pointers."""
    bh = tl.program_id(0)
    b = bh // H
    kv = b * (H // GROUP) + (bh % H) // GROUP
    return bh, b, q_ptr + bh * L * D, k_ptr + kv * L * D, v_ptr + kv * L * D


@triton.jit
def span_summary_kernel(q_ptr, k_ptr, v_ptr, m_ptr, ns_ptr, ne_ptr, sk_ptr, sv_ptr, sok_ptr,
                        L, n_spans, scale, H, GROUP,
                        D: tl.constexpr, BT: tl.constexpr):
    bh, b, qbase, kbase, vbase = _bases(q_ptr, k_ptr, v_ptr, L, H, GROUP, D)
    n = tl.program_id(1)
    start = tl.load(ns_ptr + n)
    end = tl.minimum(tl.load(ne_ptr + n), L)
    rd = tl.arange(0, D)
    rt = tl.arange(0, BT)
    qmax = tl.full((D,), NEG, tl.float32)
    kmax = tl.full((D,), NEG, tl.float32)
    cnt = 0.0
    for t0 in range(start, end, BT):
        offs = t0 + rt
        live = (offs < end) & (tl.load(m_ptr + b * L + offs, mask=offs < end, other=0) > 0)
        qt = tl.load(qbase + offs[:, None] * D + rd[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        kt = tl.load(kbase + offs[:, None] * D + rd[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        qmax = tl.maximum(qmax, tl.max(tl.where(live[:, None], qt, NEG), 0))
        kmax = tl.maximum(kmax, tl.max(tl.where(live[:, None], kt, NEG), 0))
        cnt += tl.sum(live.to(tl.float32), 0)
    ok = cnt > 0
    qmax = tl.where(ok, qmax, 0.0)
    kmax = tl.where(ok, kmax, 0.0)
    m_run = NEG
    l_run = 0.0
    acc = tl.zeros((D,), tl.float32)
    for t0 in range(start, end, BT):
        offs = t0 + rt
        live = (offs < end) & (tl.load(m_ptr + b * L + offs, mask=offs < end, other=0) > 0)
        kt = tl.load(kbase + offs[:, None] * D + rd[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        vt = tl.load(vbase + offs[:, None] * D + rd[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        x = tl.where(live, tl.sum(kt * qmax[None, :], 1) * scale, NEG)
        m_new = tl.maximum(m_run, tl.max(x, 0))
        alpha = tl.exp(m_run - m_new)
        p = tl.where(live, tl.exp(x - m_new), 0.0)
        l_run = l_run * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
        m_run = m_new
    sv = tl.where(ok, acc / tl.maximum(l_run, 1e-30), 0.0)
    out = (bh * n_spans + n) * D + rd
    tl.store(sk_ptr + out, kmax)
    tl.store(sv_ptr + out, sv)
    tl.store(sok_ptr + bh * n_spans + n, ok.to(tl.float32))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 inputs: exact fp32 products (CPU interpreter, tests); fp16/bf16: tensor cores, fp32 accumulation."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fold(m_i, l_i, acc, x, val, IEEE: tl.constexpr):
    """Online softmax: fold logits x [BB, S] with values val [S, D] (tl.dot) into the running state."""
    m_new = tl.maximum(m_i, tl.max(x, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(x - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p.to(val.dtype), val, IEEE)


@triton.jit
def _fold_col(m_i, l_i, acc, x, val):
    """Online softmax: fold one logit per query x [BB] with its value row val [BB, D] (or [1, D])."""
    m_new = tl.maximum(m_i, x)
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(x - m_new)
    return m_new, l_i * alpha + p, acc * alpha[:, None] + p[:, None] * val


@triton.jit
def combiner_fwd_kernel(q_ptr, k_ptr, v_ptr, m_ptr, sk_ptr, sv_ptr, sok_ptr, rv_ptr, loff_ptr, o_ptr,
                        L, nb, n_spans, scale, H, GROUP,
                        D: tl.constexpr, B: tl.constexpr, BB: tl.constexpr, PATTERN: tl.constexpr,
                        CAUSAL: tl.constexpr, LEVELS: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr):
    # PATTERN: 0 direct only (axial row summaries), 1 fixed, 2 logsparse, 3 axial
    bh, b, qbase, kbase, vbase = _bases(q_ptr, k_ptr, v_ptr, L, H, GROUP, D)
    qb = tl.program_id(1)
    rd = tl.arange(0, D)
    rb = tl.arange(0, BB)
    offs = qb * B + rb
    inb = (rb < B) & (offs < L)
    q = tl.load(qbase + offs[:, None] * D + rd[None, :], mask=inb[:, None], other=0.0)
    k = tl.load(kbase + offs[:, None] * D + rd[None, :], mask=inb[:, None], other=0.0)
    v = tl.load(vbase + offs[:, None] * D + rd[None, :], mask=inb[:, None], other=0.0)
    kvalid = inb & (tl.load(m_ptr + b * L + offs, mask=inb, other=0) > 0)
    s = _dot(q, tl.trans(k), IEEE) * scale
    ok = kvalid[None, :]
    if CAUSAL:
        ok = ok & (offs[None, :] <= offs[:, None])
    s = tl.where(ok, s, NEG)
    m_i = tl.max(s, 1)
    p = tl.exp(s - m_i[:, None])
    l_i = tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, IEEE)
    qf = q.to(tl.float32)

    if PATTERN == 1:  # fixed: every other block's summary, BS spans per step
        rs = tl.arange(0, BS)
        for s0 in range(0, nb, BS):
            sid = s0 + rs
            sm = sid < nb
            sk = tl.load(sk_ptr + (bh * n_spans + sid[:, None]) * D + rd[None, :], mask=sm[:, None], other=0.0)
            sv = tl.load(sv_ptr + (bh * n_spans + sid[:, None]) * D + rd[None, :], mask=sm[:, None], other=0.0)
            sok = tl.load(sok_ptr + bh * n_spans + sid, mask=sm, other=0.0) > 0
            allowed = sm & sok & (sid != qb)
            if CAUSAL:
                allowed = allowed & (sid < qb)
            x = tl.where(allowed[None, :], _dot(q, tl.trans(sk.to(q.dtype)), IEEE) * scale, NEG)
            m_i, l_i, acc = _fold(m_i, l_i, acc, x, sv.to(q.dtype), IEEE)
    if PATTERN == 2:  # logsparse: the sibling of the block's ancestor at every tree level
        for r in tl.static_range(LEVELS):
            own = qb >> r
            sib = own ^ 1
            nr = (nb + (1 << r) - 1) >> r
            idx = tl.load(loff_ptr + r) + tl.minimum(sib, nr - 1)
            sk = tl.load(sk_ptr + (bh * n_spans + idx) * D + rd)
            sv = tl.load(sv_ptr + (bh * n_spans + idx) * D + rd)
            allowed = (sib < nr) & (tl.load(sok_ptr + bh * n_spans + idx) > 0)
            if CAUSAL:
                allowed = allowed & (sib < own)
            x = tl.where(allowed, tl.sum(qf * sk[None, :], 1) * scale, NEG)
            m_i, l_i, acc = _fold_col(m_i, l_i, acc, x, sv[None, :])
    if PATTERN == 3:  # axial: every other row through the cell in this query's column
        rows = nb
        if CAUSAL:
            rows = qb
        for r in range(0, rows):
            cells = r * B + rb
            cm = (rb < B) & (cells < L)
            live = cm & (tl.load(m_ptr + b * L + cells, mask=cm, other=0) > 0) & (r != qb)
            kc = tl.load(kbase + cells[:, None] * D + rd[None, :], mask=cm[:, None], other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + (bh * L + cells[:, None]) * D + rd[None, :], mask=cm[:, None], other=0.0)
            x = tl.where(live, tl.sum(qf * kc, 1) * scale, NEG)
            m_i, l_i, acc = _fold_col(m_i, l_i, acc, x, rv)
    out = acc / l_i[:, None]
    tl.store(o_ptr + (bh * L + offs[:, None]) * D + rd[None, :], out.to(o_ptr.dtype.element_ty), mask=inb[:, None])


def _spans(pattern: str, L: int, B: int, levels: int, device) -> tuple:
    """Token ranges of every span summary, and the first span index of each logsparse level."""
    import torch

    nb = triton.cdiv(L, B)
    if pattern == "fixed":
        starts = [i * B for i in range(nb)]
        ends = [(i + 1) * B for i in range(nb)]
        loff = [0]
    else:
        starts, ends, loff = [], [], []
        for r in range(levels):
            size = (2 ** r) * B
            loff.append(len(starts))
            n = triton.cdiv(nb, 2 ** r)
            starts += [m * size for m in range(n)]
            ends += [(m + 1) * size for m in range(n)]
    t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return t(starts), t(ends), t(loff)


def combiner_attention_triton(q, k, v, key_mask, pattern: str, block: int, causal: bool, scale: float,
                              levels: int = 0, out=None):
    """The kernels on torch tensors (GPU, or CPU under TRITON_INTERPRET=1): same contract as the reference."""
    import math

    import torch

    b, h, L, d = q.shape
    kvh = k.shape[1]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = (torch.ones(b, L, device=q.device) if key_mask is None else key_mask.to(q.device) > 0).to(torch.int32).contiguous()
    nb = triton.cdiv(L, block)
    BB = max(16, triton.next_power_of_2(block))
    levels = levels or max(1, math.ceil(math.log2(max(nb, 1))))
    out = torch.empty_like(q) if out is None else out
    dummy = torch.zeros(1, device=q.device, dtype=torch.float32)
    common = dict(D=d, B=block, BB=BB, LEVELS=levels, BS=BLOCK_S, IEEE=q.dtype == torch.float32, num_warps=NUM_WARPS)
    sk = sv = sok = rv = dummy
    loff = torch.zeros(1, dtype=torch.int32, device=q.device)
    n_spans = 1
    if pattern in ("fixed", "logsparse"):
        ns, ne, loff = _spans(pattern, L, block, levels, q.device)
        n_spans = ns.numel()
        sk = torch.empty(b * h, n_spans, d, device=q.device, dtype=torch.float32)
        sv = torch.empty_like(sk)
        sok = torch.empty(b * h, n_spans, device=q.device, dtype=torch.float32)
        span_summary_kernel[(b * h, n_spans)](q, k, v, mask, ns, ne, sk, sv, sok, L, n_spans, scale, h, h // kvh,
                                              D=d, BT=BLOCK_T, num_warps=NUM_WARPS)
    elif pattern == "axial":
        rv = torch.empty(b, h, L, d, device=q.device, dtype=torch.float32)
        combiner_fwd_kernel[(b * h, nb)](q, k, v, mask, dummy, dummy, dummy, dummy, loff, rv, L, nb, 1, scale, h,
                                         h // kvh, PATTERN=0, CAUSAL=False, **common)
    code = {"fixed": 1, "logsparse": 2, "axial": 3}[pattern]
    combiner_fwd_kernel[(b * h, nb)](q, k, v, mask, sk, sv, sok, rv, loff, out, L, nb, n_spans, scale, h, h // kvh,
                                     PATTERN=code, CAUSAL=causal, **common)
    return out
