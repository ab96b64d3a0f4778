"""Combiner structured attention (the torch reference in reference.py) as one custom op, fed by the q/k/v projections.

Inputs q [b, heads, L, d] (after RoPE), k, v [b, kv_heads, L, d], key_mask [b, L] (1 = real token, in q's
dtype); output [b, heads, L, d]. Attributes: pattern (0 fixed, 1 logsparse, 2 axial), block, causal, heads,
kv_heads, scale, levels (logsparse tree depth of the longest length built for; 0 otherwise).

This package: SPEC (below); the torch reference (reference.py, which the model-side attention/ also runs); the standard-op
body (lowering.py: the reference traced by the dynamo exporter with a dynamic length, so ONNX Runtime runs
exactly the reference's sub-quadratic graph); the Triton kernels and their launch (kernel.py).
The body depends on the attributes (the pattern's structure), so it is inlined per node and not shipped
as a model-local function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import Attr, Launch, OpSpec
from .lowering import PATTERN_CODES, body, config_of


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    return [list(dims[0])]


def _reference(q, k, v, key_mask, **attrs):
    from .reference import combiner_attention

    return (combiner_attention(q, k, v, key_mask, config_of(attrs)),)


@dataclass
class CombinerLaunch(Launch):
    """Span-summary kernel then the fused attention kernel (axial: the row pass first) on the current stream."""

    inputs: tuple = ()
    output: Any = None
    attrs: dict | None = None

    def __call__(self) -> Any:
        from .kernel import combiner_attention_triton

        q, k, v, m = self.inputs
        a = self.attrs
        return combiner_attention_triton(q, k, v, m, PATTERN_CODES[int(a["pattern"])], int(a["block"]),
                                         bool(a["causal"]), float(a["scale"]), int(a["levels"]), out=self.output)


def launch(inputs: list, outputs: list, attrs: dict) -> Launch:
    from . import kernel as k  # lazily: TRITON_INTERPRET=1 must be set before triton compiles

    return CombinerLaunch(k.combiner_fwd_kernel, (), (), num_warps=k.NUM_WARPS, inputs=tuple(inputs),
                          output=outputs[0], attrs=dict(attrs))


def example(scale: int, dtype, device: str) -> tuple[list, dict]:
    """SmolLM2's layout (9 query heads, 3 KV heads, d 64), causal fixed pattern, L = 1024 * scale, block 32."""
    import torch

    g = torch.Generator().manual_seed(scale)
    L = 1024 * scale
    q, k, v = (torch.randn(1, n, L, 64, generator=g).to(dtype=dtype, device=device) for n in (9, 3, 3))
    return [q, k, v, torch.ones(1, L, dtype=dtype, device=device)], {
        "pattern": 0, "block": 32, "causal": 1, "heads": 9, "kv_heads": 3, "scale": 0.125, "levels": 0}


SPEC = OpSpec(
    name="CombinerAttention",
    inputs=("q", "k", "v", "key_mask"), outputs=("y",),
    input_types=("T", "T", "T", "T"), output_types=("T",),
    attrs=(Attr("pattern", "int", 0, "0 fixed, 1 logsparse, 2 axial"), Attr("block", "int", 16, "tokens per block"),
           Attr("causal", "int", 0, "1: no output depends on a later token"),
           Attr("heads", "int", 1, "query heads"), Attr("kv_heads", "int", 1, "key/value heads (grouped)"),
           Attr("scale", "float", 1.0, "logit scale"),
           Attr("levels", "int", 0, "logsparse tree depth (from the longest length built for)")),
    output_shapes=_shapes,
    reference=_reference,
    body=body,
    body_name="standard",
    local_function=False,
    launch=launch,
    example=example,
    doc=__doc__ or "",
)
