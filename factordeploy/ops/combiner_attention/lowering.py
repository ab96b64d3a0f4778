"""The Combiner op on ONNX Runtime: its standard-op body is the torch reference traced by the dynamo exporter.

Writing the three patterns again in graphsurgeon would be a second implementation to keep equal to the
reference; instead the reference (reference.py: Pad to a block multiple, block Reshapes, ReduceMax pooling,
batched MatMuls, one Softmax over the concatenated direct and span logits) is exported once per attribute
set and head size with a dynamic batch and length, and its nodes are inlined in place of each custom node.
The trace runs at the longest length the tree depth allows, so the exporter keeps general shapes (every
logsparse level has two nodes in the example), and the graph stays sub-quadratic for any length.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs

from ..body import Body
from .reference import PATTERNS, CombinerConfig

PATTERN_CODES = dict(enumerate(PATTERNS))  # attribute value -> pattern name


def config_of(attrs: dict) -> CombinerConfig:
    """The reference's config from node attributes (levels -> the max length that gives that tree depth)."""
    block, levels = int(attrs["block"]), int(attrs.get("levels", 0))
    return CombinerConfig(pattern=PATTERN_CODES[int(attrs["pattern"])], block=block, causal=bool(attrs["causal"]),
                          heads=int(attrs["heads"]), kv_heads=int(attrs["kv_heads"]), scale=float(attrs["scale"]),
                          max_len=block * 2 ** levels if levels else 0)


def op_attrs(cfg: CombinerConfig) -> dict[str, Any]:
    """Node attributes for a reference config (the inverse of config_of)."""
    import math

    levels = max(1, math.ceil(math.log2(max(1, -(-cfg.max_len // cfg.block))))) if cfg.pattern == "logsparse" else 0
    return {"pattern": PATTERNS.index(cfg.pattern), "block": cfg.block, "causal": int(cfg.causal),
            "heads": cfg.heads, "kv_heads": cfg.kv_heads, "scale": float(cfg.scale), "levels": levels}


@functools.lru_cache(maxsize=16)
def traced_body(attrs: tuple, head_dim: int, elem: int) -> onnx.ModelProto:
    """The reference for these attributes as a standalone ONNX graph (inputs q, k, v, key_mask; output y)."""
    import torch

    from .reference import combiner_attention

    a = dict(attrs)
    cfg = config_of(a)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    tdt = torch.from_numpy(np.zeros(1, dtype=dtype)).dtype

    class Ref(torch.nn.Module):
        def forward(self, q, k, v, key_mask):
            return combiner_attention(q, k, v, key_mask, cfg)

    L = cfg.block * 2 ** max(2, int(a["levels"]))  # >= 2 nodes at every tree level in the example
    h, kvh = cfg.heads, cfg.kv_heads
    args = (torch.randn(2, h, L, head_dim, dtype=tdt), torch.randn(2, kvh, L, head_dim, dtype=tdt),
            torch.randn(2, kvh, L, head_dim, dtype=tdt), torch.ones(2, L, dtype=tdt))
    bd, ld = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=1, max=1 << 20)
    dyn = ({0: bd, 2: ld}, {0: bd, 2: ld}, {0: bd, 2: ld}, {0: bd, 1: ld})
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(Ref().eval(), args, dynamo=True, input_names=["q", "k", "v", "key_mask"], output_names=["y"],
                                 dynamic_shapes=dyn, opset_version=18, optimize=False, verbose=False)
    return onnx.inliner.inline_local_functions(prog.model_proto)


def body(b: Body, inputs: list, outputs: list, attrs: dict | None) -> None:
    """Inline the traced reference, wired to this node's inputs and output (names under the body's prefix)."""
    if attrs is None:
        raise ValueError("the Combiner body depends on its attributes; it is not a model-local function")
    q = inputs[0]
    head_dim = q.shape[-1] if q.shape is not None else None
    if not isinstance(head_dim, (int, np.integer)):
        raise ValueError(f"the Combiner node's q input needs a static head dim, got shape {q.shape}")
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(q.dtype)) if q.dtype is not None else onnx.TensorProto.FLOAT
    key = tuple(sorted((k, v) for k, v in attrs.items() if k in ("pattern", "block", "causal", "heads", "kv_heads",
                                                                   "scale", "levels")))
    b.adopt(gs.import_onnx(traced_body(key, int(head_dim), int(elem))), inputs, outputs)
