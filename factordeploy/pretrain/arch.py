"""Model sizes for pretraining: a few LLaMA shapes with SmolLM2's tokenizer (vocab 49152).

The embedding is tied to the LM head, so at this vocabulary it dominates small models: "20M" is
12.6M embedding + 6.3M in 8 blocks. "60M" is the LLaMA-60M shape of the SLTrain/GaLore papers
(d 512, 8 blocks, ffn 1376; their vocab is 32000). "tiny" serves the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class ArchPreset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    rank: int  # the papers' r for the factorized parametrisations (d / 4, as r 128 at d 512)


PRESETS = {
    "tiny": ArchPreset(hidden=64, layers=2, heads=4, kv_heads=4, ffn=172, rank=16),
    "20M": ArchPreset(hidden=256, layers=8, heads=4, kv_heads=4, ffn=688, rank=64),
    "60M": ArchPreset(hidden=512, layers=8, heads=8, kv_heads=8, ffn=1376, rank=128),
}
ARCHS = ("llama",)


def llama_config(preset: str, vocab_size: int, max_len: int):
    """A LlamaConfig for `preset` (tied embeddings, RoPE, SwiGLU), ready for LlamaForCausalLM."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise UserError(f"unknown --params '{preset}'", f"use one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=p.hidden, intermediate_size=p.ffn,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                      max_position_embeddings=max(max_len, 256), tie_word_embeddings=True, rms_norm_eps=1e-5)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg
