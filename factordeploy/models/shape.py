"""The sizes of a model that bound what options it can take, read from its config alone (no weights).

`ModelShape.from_config(config)` works for every supported family (BERT-like encoders, Llama-like and
GPT-2-like decoders): position table, widths, heads, depth. config.check_model_limits and each
method's `validate(options, shape)` read it right after config.json is loaded and before any weight
is (models/registry.load_model's `on_config` hook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _first(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass(frozen=True)
class ModelShape:
    name: str
    kind: str                     # encoder | decoder
    max_positions: int | None     # longest sequence the position table covers (None: unbounded)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // max(self.heads, 1)

    @property
    def widths(self) -> tuple[int, ...]:
        """Input/output widths of the linears in a block (attention q/k/v/o, the MLP)."""
        return tuple(sorted({self.hidden, self.intermediate, self.kv_heads * self.head_dim}))

    @classmethod
    def from_config(cls, config: Any, name: str = "", kind: str = "encoder") -> "ModelShape":
        hidden = _first(config, "hidden_size", "n_embd", "d_model", "dim") or 1
        heads = _first(config, "num_attention_heads", "n_head", "num_heads") or 1
        return cls(name=name, kind=kind,
                   max_positions=_first(config, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"),
                   hidden=hidden,
                   intermediate=_first(config, "intermediate_size", "n_inner", "ffn_dim", "d_ff") or 4 * hidden,
                   heads=heads, kv_heads=_first(config, "num_key_value_heads") or heads,
                   layers=_first(config, "num_hidden_layers", "n_layer", "num_layers") or 1)
