"""Combiner attention: the blocked implementation against a per-query brute-force definition, causality,
padding, non-multiple lengths, full-attention equivalence, and installation into tiny HF models."""

from __future__ import annotations

import math

import pytest
import torch

from factordeploy.attention import AttentionConfig, CombinerConfig, combiner_attention, install_combiner
from factordeploy.ops.combiner_attention.reference import reference_full
from factordeploy.errors import UserError


def _spans(pattern: str, i: int, L: int, B: int, causal: bool) -> tuple[list[int], list[tuple[list[int], int | None]]]:
    """Direct positions of query i and its spans as (positions, representative column or None), by definition."""
    nb = math.ceil(L / B)
    bi = i // B
    blocks = lambda a, z: [p for p in range(a * B, min(z * B, L))]  # noqa: E731
    direct = [j for j in blocks(bi, bi + 1) if not causal or j <= i]
    spans: list[tuple[list[int], int | None]] = []
    if pattern in ("fixed", "axial"):
        for r in range(nb):
            if r == bi or (causal and r > bi):
                continue
            spans.append((blocks(r, r + 1), i % B if pattern == "axial" else None))
    else:
        for lvl in range(max(1, math.ceil(math.log2(nb))) if nb > 1 else 1):
            size = 2 ** lvl
            own = bi // size
            sib = own ^ 1
            if sib * size >= nb or (causal and sib > own):
                continue
            spans.append((blocks(sib * size, (sib + 1) * size), None))
    return direct, spans


def _brute(q, k, v, mask, pattern, B, causal, scale):
    """O(L^2) per-query Combiner straight from the definition (independent of the blocked code)."""
    b, h, L, d = q.shape
    g = h // k.shape[1]
    out = torch.zeros_like(q)
    for bb in range(b):
        ok = [bool(mask[bb, j]) for j in range(L)]
        for hh in range(h):
            qq, kk, vv = q[bb, hh], k[bb, hh // g], v[bb, hh // g]
            for i in range(L):
                direct, spans = _spans(pattern, i, L, B, causal)
                logits, vals = [], []
                for j in direct:
                    if ok[j]:
                        logits.append(qq[i] @ kk[j] * scale)
                        vals.append(vv[j])
                for pos, col in spans:
                    if col is not None:  # axial: the row seen through its cell in column col
                        r0 = pos[0]
                        if r0 + col >= L or not ok[r0 + col]:
                            continue
                        key, query = kk[r0 + col], qq[r0 + col]
                    else:
                        live = [j for j in pos if ok[j]]
                        if not live:
                            continue
                        key = torch.stack([kk[j] for j in live]).amax(0)
                        query = torch.stack([qq[j] for j in live]).amax(0)
                    live = [j for j in pos if ok[j]]
                    w = torch.softmax(torch.stack([query @ kk[j] * scale for j in live]), 0)
                    logits.append(qq[i] @ key * scale)
                    vals.append(sum(wj * vv[j] for wj, j in zip(w, live)))
                if logits:
                    p = torch.softmax(torch.stack(logits), 0)
                    out[bb, hh, i] = sum(pj * vj for pj, vj in zip(p, vals))
    return out


def _qkv(b=2, h=4, kvh=2, L=13, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, L, d, generator=gen, dtype=torch.float64),
            torch.randn(b, kvh, L, d, generator=gen, dtype=torch.float64),
            torch.randn(b, kvh, L, d, generator=gen, dtype=torch.float64))


def _cfg(pattern, B, causal, h=4, kvh=2, d=8):
    return CombinerConfig(pattern=pattern, block=B, causal=causal, heads=h, kv_heads=kvh, scale=d ** -0.5)


@pytest.mark.parametrize("pattern", ["fixed", "logsparse", "axial"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,B", [(13, 4), (16, 4), (21, 3), (7, 2)])
def test_matches_definition(pattern, causal, L, B):
    q, k, v = _qkv(L=L)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, L - 3:] = 0  # right padding in the second sequence
    got = combiner_attention(q, k, v, mask, _cfg(pattern, B, causal))
    want = _brute(q, k, v, mask, pattern, B, causal, 8 ** -0.5)
    valid = mask.bool()[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pattern", ["fixed", "logsparse", "axial"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_block_is_full_attention(pattern, causal):
    q, k, v = _qkv(L=11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, 8:] = 0
    got = combiner_attention(q, k, v, mask, _cfg(pattern, 16, causal))
    want = reference_full(q, k, v, mask, causal, 8 ** -0.5)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0, :, :8], want[0, :, :8])


@pytest.mark.parametrize("pattern", ["fixed", "logsparse", "axial"])
def test_causal_never_sees_the_future(pattern):
    L, t = 29, 12
    q, k, v = _qkv(L=L, seed=1)
    cfg = _cfg(pattern, 4, True)
    base = combiner_attention(q, k, v, None, cfg)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 5
    moved = combiner_attention(q2, k2, v2, None, cfg)
    torch.testing.assert_close(moved[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(moved[:, :, t + 1:], base[:, :, t + 1:])


@pytest.mark.parametrize("pattern", ["fixed", "logsparse", "axial"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_are_never_read(pattern, causal):
    L = 18
    q, k, v = _qkv(L=L, seed=2)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, :5] = 0     # left padding
    mask[1, 14:] = 0    # right padding
    cfg = _cfg(pattern, 4, causal)
    base = combiner_attention(q, k, v, mask, cfg)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    pad = ~mask.bool()
    k2[:, :, :][pad[:, None, :].expand(-1, k.shape[1], -1)] = 7.0
    v2[pad[:, None, :].expand(-1, v.shape[1], -1)] = -3.0
    q2[pad[:, None, :].expand(-1, q.shape[1], -1)] = 9.0
    moved = combiner_attention(q2, k2, v2, mask, cfg)
    keep = mask.bool()[:, None, :, None].expand_as(base)
    torch.testing.assert_close(moved[keep], base[keep], rtol=1e-12, atol=1e-12)


def test_logsparse_symbolic_depth_matches_eager(monkeypatch):
    """Export uses the tree depth of max_len (symbolic L); the extra, empty levels must change nothing."""
    q, k, v = _qkv(L=19, seed=3)
    a = combiner_attention(q, k, v, None, _cfg("logsparse", 4, True))
    deep = CombinerConfig(pattern="logsparse", block=4, causal=True, heads=4, kv_heads=2, scale=8 ** -0.5, max_len=512)
    assert deep.levels(128) == 7
    monkeypatch.setattr(CombinerConfig, "levels", lambda self, nb: 7)
    b = combiner_attention(q, k, v, None, deep)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- installed into tiny HF models ----

def _load(path):
    from factordeploy.models.registry import load_model

    return load_model(str(path))


@pytest.mark.parametrize("kind", ["combiner-fixed", "combiner-logsparse", "combiner-axial"])
def test_tiny_llama_block_covering_everything_is_unchanged(tiny_llama_dir, kind):
    lm = _load(tiny_llama_dir)
    ids = torch.randint(5, 1000, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = lm.model(input_ids=ids, attention_mask=mask).logits
        names = install_combiner(lm.model, AttentionConfig(kind=kind, block=32, max_len=64))
        got = lm.model(input_ids=ids, attention_mask=mask).logits
    assert len(names) == 2 and lm.model.model.layers[0].self_attn.combiner.cfg.kv_heads == 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["combiner-fixed", "combiner-logsparse", "combiner-axial"])
def test_tiny_llama_causal_through_the_model(tiny_llama_dir, kind):
    lm = _load(tiny_llama_dir)
    install_combiner(lm.model, AttentionConfig(kind=kind, block=4, max_len=64))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (1, 23), generator=gen)
    ids2 = ids.clone()
    ids2[0, 10:] = torch.randint(5, 1000, (13,), generator=gen)
    with torch.no_grad():
        a = lm.model(input_ids=ids).logits
        b = lm.model(input_ids=ids2).logits
    torch.testing.assert_close(a[0, :10], b[0, :10], rtol=0, atol=0)
    full = _load(tiny_llama_dir)
    with torch.no_grad():
        f = full.model(input_ids=ids).logits
    assert (a[0, 4:] - f[0, 4:]).abs().max() > 1e-4  # the structure does change the far-context outputs
    torch.testing.assert_close(a[0, :4], f[0, :4], rtol=1e-4, atol=1e-4)  # first block: direct only = full


def test_tiny_bert_bidirectional(tiny_bert_dir):
    lm = _load(tiny_bert_dir)
    ids = torch.randint(1000, 2000, (2, 17))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    with torch.no_grad():
        want = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        install_combiner(lm.model, AttentionConfig(kind="combiner-fixed", block=32, max_len=64))
        same = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert lm.model.encoder.layer[0].attention.self.combiner.cfg.causal is False
        for m in lm.model.modules():
            if hasattr(m, "combiner"):
                m.combiner.cfg = CombinerConfig(**{**m.combiner.cfg.__dict__, "block": 4})
        blocked = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(same[1], want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(same[0, :12], want[0, :12], rtol=1e-4, atol=1e-4)
    assert (blocked[1] - want[1]).abs().max() > 1e-3


def test_bad_attention_input():
    with pytest.raises(UserError, match="larger than the maximum sequence length 64.*attention-block <= 64"):
        install_combiner(torch.nn.Linear(2, 2), AttentionConfig(kind="combiner-fixed", block=128, max_len=64))
    with pytest.raises(UserError, match="not supported for Linear.*--attention full"):
        install_combiner(torch.nn.Linear(2, 2), AttentionConfig(kind="combiner-fixed", block=8, max_len=64))
    with pytest.raises(UserError, match="unknown --attention 'combiner-foo'"):
        install_combiner(torch.nn.Linear(2, 2), AttentionConfig(kind="combiner-foo", block=8, max_len=64))
