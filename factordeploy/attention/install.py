"""Swap a trained model's attention core for Combiner, keeping its trained q/k/v/o projections.

Each self-attention module keeps its own (possibly factorized) q/k/v/o linears and RoPE; only the
score/softmax/mix core changes: the module gets a `combiner` child (`CombinerCore`, no weights)
and the model's attention implementation becomes "combiner", which transformers' attention interface
dispatches to that child. With a custom implementation transformers hands the attention the plain
2-D padding mask [b, L] (no L x L mask is ever built), which is what keeps the cost sub-quadratic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..ops.combiner_attention import SPEC
from ..ops.combiner_attention.lowering import op_attrs
from ..ops.combiner_attention.reference import PATTERNS, CombinerConfig, combiner_attention
from ..ops.export import emit

IMPLEMENTATION = "combiner"
CHOICES = ("full",) + tuple(f"combiner-{p}" for p in PATTERNS)


@dataclass(frozen=True)
class AttentionConfig:
    """--attention / --attention-block, resolved against the profile's sequence lengths."""

    kind: str = "full"          # full | combiner-fixed | combiner-logsparse | combiner-axial
    block: int = 0              # 0 = default_block(opt_len)
    max_len: int = 512          # the longest sequence the artifact is built for (profile max)

    @property
    def pattern(self) -> str | None:
        return None if self.kind == "full" else self.kind.removeprefix("combiner-")


def default_block(opt_len: int) -> int:
    """About sqrt(L) for the profile's opt length, rounded to a power of two (>= 4)."""
    return max(4, 2 ** round(math.log2(math.sqrt(max(opt_len, 1)))))


def check_attention(cfg: AttentionConfig) -> None:
    """Bad --attention / --attention-block values, one line each (before any work)."""
    if cfg.kind not in CHOICES:
        raise UserError(f"unknown --attention '{cfg.kind}'", "use one of " + ", ".join(CHOICES))
    if cfg.kind == "full":
        return
    if cfg.block < 1:
        raise UserError(f"--attention-block must be >= 1, got {cfg.block}", "pass e.g. --attention-block 16")
    if cfg.block > cfg.max_len:
        raise UserError(f"--attention-block {cfg.block} is larger than the maximum sequence length {cfg.max_len}",
                        f"pass --attention-block <= {cfg.max_len} (about sqrt of the sequence length), "
                        "or raise the --seq max")


class CombinerCore(nn.Module):
    """The Combiner core of one attention layer: (q [b,h,L,d], k/v [b,kvh,L,d], key_mask [b,L]) -> [b,h,L,d]."""

    def __init__(self, cfg: CombinerConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # one custom node; passes lower it (ORT) or keep it (TensorRT plugin)
            mask = q.new_ones(q.shape[0], q.shape[2]) if key_mask is None else key_mask.to(q.dtype)
            return emit(SPEC, (q, k, v, mask), op_attrs(self.cfg))
        return combiner_attention(q, k, v, key_mask, self.cfg)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"pattern={c.pattern}, block={c.block}, causal={c.causal}, heads={c.heads}, kv_heads={c.kv_heads}"


def _combiner_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; returns [b, L, h, d] like the built-in ones."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise RuntimeError("Combiner attention expects the 2-D padding mask, got a "
                           f"{attention_mask.dim()}-D mask (was the model's attention implementation changed?)")
    out = module.combiner(query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _padding_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                  **kwargs) -> torch.Tensor | None:
    """transformers' mask-interface signature: Combiner builds its own block masks, it only needs padding [b, L]."""
    return attention_mask


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _combiner_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _padding_mask)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self-attention modules that call transformers' attention interface (they carry `scaling` and `is_causal`)."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "scaling") and hasattr(m, "is_causal") and hasattr(m, "config")
            and not getattr(m, "is_cross_attention", False)]


def check_supported(model: nn.Module, cfg: AttentionConfig) -> list[tuple[str, nn.Module]]:
    """The model's self-attention modules, or a one-line error when Combiner cannot replace them."""
    check_attention(cfg)
    if cfg.pattern is None:
        return []
    mods = attention_modules(model)
    if not getattr(model, "_supports_attention_backend", False) or not mods:
        raise UserError(f"--attention {cfg.kind} is not supported for {type(model).__name__}: its attention does "
                        "not go through transformers' attention interface", "use --attention full for this model")
    return mods


def install_combiner(model: nn.Module, cfg: AttentionConfig) -> list[str]:
    """Give every self-attention of `model` a Combiner core; returns the module names changed."""
    mods = check_supported(model, cfg)
    if not mods:
        return []
    _register()
    for _, m in mods:
        c = m.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        m.combiner = CombinerCore(CombinerConfig(pattern=cfg.pattern, block=cfg.block, causal=bool(m.is_causal),
                                                      heads=heads, kv_heads=kv, scale=float(m.scaling),
                                                      max_len=cfg.max_len))
    model.config._attn_implementation = IMPLEMENTATION
    return [n for n, _ in mods]
