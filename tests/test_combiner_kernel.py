"""The Combiner Triton kernels (ops/combiner_attention/kernel.py) under TRITON_INTERPRET=1 against the torch
reference (ops/combiner_attention/reference.py): every pattern, causal and bidirectional, grouped KV heads, lengths that are
not block multiples, blocks that are not powers of two, left/right padding."""

from __future__ import annotations

import itertools

import pytest
import torch

from factordeploy.attention import CombinerConfig, combiner_attention

CASES = [(13, 4), (40, 8), (7, 16), (33, 5)]


@pytest.mark.parametrize("pattern,causal", list(itertools.product(["fixed", "logsparse", "axial"], [False, True])))
def test_kernel_matches_reference(pattern, causal):
    from factordeploy.ops.combiner_attention.kernel import combiner_attention_triton

    g = torch.Generator().manual_seed(7)
    for L, B in CASES:
        b, h, kvh, d = 2, 4, 2, 16
        q, k, v = (torch.randn(b, n, L, d, generator=g) for n in (h, kvh, kvh))
        m = torch.ones(b, L, dtype=torch.long)
        m[0, : L // 4] = 0          # left padding
        m[1, L // 2 + 1:] = 0       # right padding
        cfg = CombinerConfig(pattern, B, causal, h, kvh, d ** -0.5)
        ref = combiner_attention(q, k, v, m, cfg)
        got = combiner_attention_triton(q, k, v, m, pattern, B, causal, d ** -0.5)
        keep = m.bool()[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-5, atol=2e-6)


def test_kernel_tree_depth_beyond_the_length_changes_nothing():
    """The plugin gets the depth of the profile's max length; extra, empty levels must not matter."""
    from factordeploy.ops.combiner_attention.kernel import combiner_attention_triton

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 21, 16, generator=g) for n in (2, 1, 1))
    a = combiner_attention_triton(q, k, v, None, "logsparse", 4, True, 0.25)
    b = combiner_attention_triton(q, k, v, None, "logsparse", 4, True, 0.25, levels=7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plugin_launch_matches_the_op_reference():
    """What TensorRT's enqueue runs (SPEC.launch with the node's attributes) against SPEC.reference."""
    from factordeploy.ops import get_op
    from factordeploy.ops.combiner_attention.lowering import op_attrs

    spec = get_op("CombinerAttention")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 27, 32, generator=g) for n in (6, 2, 2))
    m = torch.ones(2, 27)
    m[1, 20:] = 0
    for pattern in ("fixed", "logsparse", "axial"):
        attrs = spec.attr_values(op_attrs(CombinerConfig(pattern, 8, True, 6, 2, 32 ** -0.5, max_len=64)))
        out = torch.empty_like(q)
        spec.launch([q, k, v, m], [out], attrs)()
        ref = spec.reference(q, k, v, m, **attrs)[0]
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(out[1, :, :20], ref[1, :, :20], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("pattern", ["fixed", "logsparse", "axial"])
def test_kernel_half_precision(pattern):
    """fp16 inputs take the tensor-core path (fp16 products, fp32 accumulation): close to the fp32 reference."""
    from factordeploy.ops.combiner_attention.kernel import combiner_attention_triton

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, n, 37, 32, generator=g) for n in (4, 2, 2))
    ref = combiner_attention(q, k, v, None, CombinerConfig(pattern, 8, True, 4, 2, 32 ** -0.5))
    got = combiner_attention_triton(q.half(), k.half(), v.half(), None, pattern, 8, True, 32 ** -0.5)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
