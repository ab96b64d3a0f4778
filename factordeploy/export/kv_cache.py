"""Decoders with a key/value cache: the signature Optimum's text-generation-with-past export uses.

One graph serves the first pass (past length 0) and every decode step:

* inputs  ``input_ids`` [batch, sequence], ``attention_mask`` [batch, past_sequence + sequence],
  ``position_ids`` [batch, sequence], and per layer ``past_key_values.{i}.key`` / ``.value``
  [batch, kv_heads, past_sequence, head_dim];
* outputs ``logits`` [batch, sequence, vocab] and ``present.{i}.key`` / ``.value``
  [batch, kv_heads, past_sequence + sequence, head_dim].

`WithPast` rebuilds a transformers ``DynamicCache`` from the flat past tensors inside
``forward`` so ``torch.export`` traces the model's own cache code; the same wrapper is the
torch reference that the export check and the generation tests compare ONNX Runtime with.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import UserError

BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQUENCE}"


@dataclass(frozen=True)
class CacheSpec:
    """Shape of a decoder's KV cache and the ONNX names that go with it."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "CacheSpec":
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise UserError(f"KV-cache export supports full-attention decoders; this model has layer types {sorted(types)}",
                            "compress a full-attention decoder (Llama, Qwen2, Mistral without sliding window...)")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, int(head_dim))

    @classmethod
    def from_graph_inputs(cls, inputs: list[tuple[str, list]]) -> "CacheSpec":
        """From an exported graph's (name, shape) inputs: past_key_values.{i}.key [b, heads, past, dim]."""
        past = [shape for name, shape in inputs if name.startswith("past_key_values.")]
        return cls(len(past) // 2, int(past[0][1]), int(past[0][3]))

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past tensors of length 0: the first (prefill) pass."""
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {n: z for n in self.past_names}

    def past_from_present(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {p: outputs[q] for p, q in zip(self.past_names, self.present_names)}


def step_inputs(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """input_ids [b, s] and the full mask [b, past + s] -> the step's non-cache inputs.

    Position ids count only attended tokens (left padding gets position 0..), as transformers'
    generate does, so a padded batch decodes like each prompt alone.
    """
    s = input_ids.shape[1]
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 0, 1, pos)[:, -s:]
    return {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
            "position_ids": pos.astype(np.int64)}


class WithPast(nn.Module):
    """Flat tensors in ONNX order -> (logits, present.0.key, present.0.value, ...)."""

    def __init__(self, model: nn.Module, spec: CacheSpec) -> None:
        super().__init__()
        self.inner, self.spec = model, spec
        # transformers >= 5.2x names the argument and output `cache` (`past_key_values` is deprecated)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.inner.config)
        for i in range(self.spec.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        presents: list[torch.Tensor] = []
        for layer in getattr(out, self.cache_arg).layers[: self.spec.layers]:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def torch_step(model: nn.Module, spec: CacheSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One cached step of the torch model on numpy feeds (the reference for ONNX Runtime)."""
    device = next(model.parameters()).device
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in spec.input_names]
    with torch.no_grad():
        outs = WithPast(model, spec)(*args)
    return {n: o.float().cpu().numpy() for n, o in zip(spec.output_names, outs)}


def example_args(spec: CacheSpec, input_ids: torch.Tensor, past: int = 3) -> tuple[torch.Tensor, ...]:
    """Trace inputs with a non-zero past (so no axis is specialised to 0 or 1)."""
    b, s = input_ids.shape
    mask = torch.ones(b, past + s, dtype=torch.long)
    pos = torch.arange(past, past + s).expand(b, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(b, spec.kv_heads, past, spec.head_dim, generator=g) for _ in spec.past_names]
    return (input_ids, mask, pos, *kv)


def dynamic_shapes(spec: CacheSpec, max_positions: int) -> tuple:
    b = torch.export.Dim(BATCH, min=1, max=4096)
    s = torch.export.Dim(SEQUENCE, min=1, max=max_positions)
    p = torch.export.Dim(PAST, min=0, max=max_positions)
    total = torch.export.Dim("total_sequence_length", min=1, max=2 * max_positions)
    return ({0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in spec.past_names))


def name_total_axis(proto) -> None:
    """Optimum's name for the mask's length (torch.export cannot express past + sequence on an input)."""
    for vi in proto.graph.input:
        if vi.name == "attention_mask":
            vi.type.tensor_type.shape.dim[1].dim_param = TOTAL


def is_with_past(input_names: list[str]) -> bool:
    return any(n.startswith("past_key_values.") for n in input_names)


def check_feeds(spec: CacheSpec, model: nn.Module, prompts: list[np.ndarray], steps: int = 3,
                seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs for the export check: per prompt batch, a prefill (past 0) and `steps` decode steps.

    Each decode step's past comes from the torch model's previous step and its next token is
    the torch model's greedy choice, so torch and ONNX Runtime see identical inputs and are
    compared on logits AND on every present tensor, step by step.
    """
    feeds: list[dict[str, np.ndarray]] = []
    for ids in prompts:
        mask = np.ones_like(ids)
        f = step_inputs(ids, mask) | spec.empty_past(ids.shape[0])
        for k in range(steps + 1):
            feeds.append(f)
            if k == steps:
                break
            out = torch_step(model, spec, f)
            nxt = out["logits"][:, -1].argmax(-1)[:, None]
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            f = step_inputs(nxt, mask) | spec.past_from_present(out)
    return feeds

