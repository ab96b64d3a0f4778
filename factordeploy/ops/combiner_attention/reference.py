"""Combiner structured attention (NeurIPS 2021), the torch reference: a local set plus span summaries, one softmax.

The model-side code (attention/) calls this same function; during ONNX export it emits the op's node instead.

Every query position i attends directly to the positions of its own block (causal: those <= i) and,
through one summary per span, to every other position: for a span Omega,

    span key   = max-pool of the span's keys
    span value = sum_j softmax_j(scale * qmax . k_j) v_j  over j in Omega, qmax = max-pool of the span's queries

and the direct logits and span logits share ONE softmax, so the probability a query gives a span is
split over the span's tokens by the span's own attention (the paper's conditional expectation).

Patterns (sequence padded to nb = ceil(L / B) blocks of B tokens):
- `fixed`: the spans are the other blocks (causal: earlier blocks). O(L (B + L/B)).
- `logsparse`: the spans are the siblings of a block's path in a binary tree over the blocks (level r: a
  span of 2^r blocks; causal: only the left siblings), log2(nb) spans per query. O(L (B + log L)).
- `axial`: the blocks are the rows of a row-major grid; a query in column c sees every other row
  (causal: earlier rows) through that row's cell in column c: key = the cell's key, value = the cell's
  query attending over its whole row (the public code's `axial_rowmajor`, row summary 'none'). O(L (B + L/B)).

Grouped KV heads stay grouped (queries reshaped to [b, kv_heads, group, L, d]; keys are never repeated).
Padded keys (key_mask 0) are never attended; a span with no valid key gets no probability. When B >= L
there is one block and every pattern is exactly full attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATTERNS = ("fixed", "logsparse", "axial")


@dataclass(frozen=True)
class CombinerConfig:
    """The node attributes of one Combiner attention (also the ONNX op's attributes)."""

    pattern: str
    block: int
    causal: bool
    heads: int
    kv_heads: int
    scale: float
    max_len: int = 0  # logsparse: tree depth used when the length is symbolic (export); 0 = from L

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown Combiner pattern {self.pattern!r} (one of {PATTERNS})")
        if self.block < 1 or self.heads % self.kv_heads:
            raise ValueError(f"bad Combiner config {self}")

    def levels(self, blocks: int | torch.SymInt) -> int:
        """Tree depth of the logsparse pattern: ceil(log2(blocks)), from max_len when blocks is symbolic."""
        n = blocks if isinstance(blocks, int) else -(-self.max_len // self.block)
        if not isinstance(blocks, int) and self.max_len < 1:
            raise ValueError("logsparse with a symbolic length needs max_len")
        return max(1, math.ceil(math.log2(max(n, 1))))


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _masked_max(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over `dim` of the valid entries (x [..., n, d], valid [..., n, 1]); 0 where none is valid."""
    pooled = x.masked_fill(~valid, _neg(x.dtype)).amax(dim)
    return pooled.masked_fill(~valid.any(dim), 0.0)


def _span_values(qmax: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Each span's attention under its pooled query: qmax [..., s, d], keys/values [..., s, n, d], valid [..., s, n]."""
    logits = (keys @ qmax.unsqueeze(-1)).squeeze(-1) * scale
    p = logits.masked_fill(~valid, _neg(logits.dtype)).softmax(-1) * valid
    return (p.unsqueeze(-2) @ values).squeeze(-2)


def combiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                       cfg: CombinerConfig) -> torch.Tensor:
    """q [b, heads, L, d], k/v [b, kv_heads, L, d], key_mask [b, L] (1 = real token) or None -> [b, heads, L, d]."""
    b, h, L, d = q.shape
    kvh, B = k.shape[1], cfg.block
    g = h // kvh
    nb = (L + B - 1) // B
    pad = nb * B - L
    valid = torch.ones(b, L, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.to(torch.bool)
    # always pad (possibly by 0): a branch on the symbolic length would specialize the exported graph
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    qb = q.reshape(b, kvh, g, nb, B, d)
    kb = k.reshape(b, kvh, 1, nb, B, d)
    vb = v.reshape(b, kvh, 1, nb, B, d)
    vblk = valid.reshape(b, 1, 1, nb, B)
    neg = _neg(q.dtype)

    # direct: own block
    direct = (qb @ kb.transpose(-1, -2)) * cfg.scale                      # [b, kvh, g, nb, B, B]
    dmask = vblk.unsqueeze(-2)                                             # keys valid
    if cfg.causal:
        dmask = dmask & torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    direct = direct.masked_fill(~dmask, neg)

    if cfg.pattern == "fixed":
        span_k = _masked_max(kb, vblk.unsqueeze(-1), -2)                   # [b, kvh, 1, nb, d]
        span_q = _masked_max(qb, vblk.unsqueeze(-1), -2)                   # [b, kvh, g, nb, d]
        span_v = _span_values(span_q, kb, vb, vblk, cfg.scale)            # [b, kvh, g, nb, d]
        span = (qb.reshape(b, kvh, g, nb * B, d) @ span_k.transpose(-1, -2)) * cfg.scale  # [b, kvh, g, nb*B, nb]
        span = span.reshape(b, kvh, g, nb, B, nb)
        blk = torch.arange(nb, device=q.device)
        allowed = (blk.unsqueeze(1) > blk.unsqueeze(0)) if cfg.causal else (blk.unsqueeze(1) != blk.unsqueeze(0))
        smask = allowed.unsqueeze(1) & vblk.any(-1).unsqueeze(-2).unsqueeze(-2)  # [.., nb(q), 1, nb(span)]
        span = span.masked_fill(~smask, neg)
        probs = torch.cat([direct, span], -1).softmax(-1)
        out = probs[..., :B] @ vb + (probs[..., B:].reshape(b, kvh, g, nb * B, nb) @ span_v).reshape(b, kvh, g, nb, B, d)
    elif cfg.pattern == "axial":
        # row summaries: each cell's query over its whole row (bidirectional inside the row)
        row_logits = (qb @ kb.transpose(-1, -2)) * cfg.scale
        row_p = row_logits.masked_fill(~vblk.unsqueeze(-2), neg).softmax(-1) * vblk.unsqueeze(-2)
        row_v = row_p @ vb                                                  # [b, kvh, g, nb, B, d]
        # column logits: query (s, c) . key (r, c)
        qc = qb.transpose(3, 4)                                             # [b, kvh, g, B, nb, d]
        kc = kb.transpose(3, 4)                                             # [b, kvh, 1, B, nb, d]
        col = (qc @ kc.transpose(-1, -2)) * cfg.scale                       # [b, kvh, g, B, nb(s), nb(r)]
        blk = torch.arange(nb, device=q.device)
        allowed = (blk.unsqueeze(1) > blk.unsqueeze(0)) if cfg.causal else (blk.unsqueeze(1) != blk.unsqueeze(0))
        cmask = allowed & vblk.transpose(3, 4).unsqueeze(-2)                # [b, 1, 1, B, nb, nb]
        col = col.masked_fill(~cmask, neg).transpose(3, 4)                  # [b, kvh, g, nb(s), B, nb(r)]
        probs = torch.cat([direct, col], -1).softmax(-1)
        pc = probs[..., B:].transpose(3, 4)                                 # [b, kvh, g, B, nb(s), nb(r)]
        out = probs[..., :B] @ vb + (pc @ row_v.transpose(3, 4)).transpose(3, 4)
    else:
        out = _logsparse(qb, kb, vb, vblk, direct, cfg)
    out = out.reshape(b, h, nb * B, d)
    return out[:, :, :L]


def _logsparse(qb, kb, vb, vblk, direct, cfg: CombinerConfig) -> torch.Tensor:
    """Spans = siblings of the block's path in a binary tree over blocks (node m at level r: blocks m*2^r..).

    Each level pads the flat token axis to whole nodes and splits it as (-1, 2^r * B): one symbolic dim split
    by a static size, which export traces without guards on the length.
    """
    b, kvh, g, nb, B, d = qb.shape
    neg = _neg(qb.dtype)
    blk = torch.arange(nb, device=qb.device)
    qf, kf, vf = (t.reshape(t.shape[0], t.shape[1], t.shape[2], nb * B, d) for t in (qb, kb, vb))
    validf = vblk.reshape(b, 1, 1, nb * B)
    logits, values = [], []
    for r in range(cfg.levels(nb)):
        size = 2 ** r                                                      # blocks per node
        n_nodes = (nb + size - 1) // size
        extra = (n_nodes * size - nb) * B                                  # tokens padded to whole nodes
        kn, vn, qn = (torch.nn.functional.pad(t, (0, 0, 0, extra)).reshape(t.shape[0], kvh, t.shape[2], -1, size * B, d)
                      for t in (kf, vf, qf))
        vl = torch.nn.functional.pad(validf, (0, extra), value=False).reshape(b, 1, 1, -1, size * B)
        node_k = _masked_max(kn, vl.unsqueeze(-1), -2)                     # [b, kvh, 1, n_nodes, d]
        node_q = _masked_max(qn, vl.unsqueeze(-1), -2)                     # [b, kvh, g, n_nodes, d]
        node_v = _span_values(node_q, kn, vn, vl, cfg.scale)              # [b, kvh, g, n_nodes, d]
        node_ok = vl.any(-1)                                               # [b, 1, 1, n_nodes]
        own = torch.div(blk, size, rounding_mode="floor")
        sib = own + 1 - 2 * (own % 2)                                      # own ^ 1
        ok = sib < n_nodes
        if cfg.causal:
            ok = ok & (sib < own)
        sib = sib.clamp(max=n_nodes - 1)
        sk = node_k.index_select(3, sib)                                   # [b, kvh, 1, nb, d]
        sv = node_v.index_select(3, sib)                                   # [b, kvh, g, nb, d]
        lg = (qb @ sk.unsqueeze(-1)).squeeze(-1) * cfg.scale               # [b, kvh, g, nb, B]
        lg = lg.masked_fill(~(ok & node_ok.index_select(3, sib)).unsqueeze(-1), neg)
        logits.append(lg)
        values.append(sv)
    span = torch.stack(logits, -1)                                         # [b, kvh, g, nb, B, R]
    span_v = torch.stack(values, -2)                                       # [b, kvh, g, nb, R, d]
    probs = torch.cat([direct, span], -1).softmax(-1)
    return probs[..., :B] @ vb + probs[..., B:] @ span_v


def reference_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                   causal: bool, scale: float) -> torch.Tensor:
    """Plain full attention with the same conventions (for equivalence tests)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = (q @ k.transpose(-1, -2)) * scale
    L = q.shape[2]
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril()
    if key_mask is not None:
        mask = mask & key_mask.to(torch.bool)[:, None, None, :]
    return logits.masked_fill(~mask, _neg(q.dtype)).softmax(-1) @ v
