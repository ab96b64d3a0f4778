"""`--quantize w8|w4`: store every constant-weight matrix of a (compressed) model block-quantized.

Quantization is a property of each stored factor (compress/quant.py), so this walks layers, never
graph nodes: each factorized layer quantizes its `matmul_factors` (low-rank A and B, 2:4 values,
DSFormer's D and S, LOST's blocks, quant-lowrank's correction), every nn.Linear inside the blocks that
a method left dense (or that was not targeted) becomes a `DenseLinear` with quantized weights, and
with `head=True` the LM head too (a tied head gets its own codes) and the token-embedding table
(int8 per row, layers.QuantEmbedding: a lookup table, not a MatMul).
Sparse-dictionary layers keep their dictionary and codes in fp32: their custom op reads D whole
(refolded or gathered), so there is no per-factor MatMul to quantize; the report lists them.

GPTQ uses each factor's input Gram matrix (from the calibration statistics) where the build has them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .layers import DenseLinear, FactorizedLinear, QuantEmbedding, layer_bytes, tensor_bytes
from .quant import QuantSpec
from .targets import DEFAULT_EXCLUDE, find_targets, get_module, set_module

MODES = ("none", "int8", "w8", "w4", "w2")  # int8: ONNX Runtime dynamic int8 of model.onnx (engines/quantize.py)
WEIGHT_ONLY = {"w8": 8, "w4": 4, "w2": 2}


@dataclass
class QuantizeLayer:
    name: str
    kind: str
    factors: list[str]
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizeSummary:
    spec: dict
    layers: list[QuantizeLayer] = field(default_factory=list)
    kept_fp32: list[str] = field(default_factory=list)  # layers with no matrix to quantize (sparse dictionary)
    head: str | None = None
    embedding: dict | None = None  # {"name", "bytes_before", "bytes_after"} when the table was quantized

    @property
    def bytes_before(self) -> int:
        return sum(x.bytes_before for x in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(x.bytes_after for x in self.layers)

    def as_dict(self) -> dict:
        return {"spec": self.spec, "head": self.head, "embedding": self.embedding, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "layers_quantized": sum(1 for x in self.layers if x.factors), "kept_fp32": self.kept_fp32,
                "layers": [asdict(x) for x in self.layers]}


def spec_for(mode: str, block: int = 32, symmetric: bool = True, algo: str = "rtn", grid: str = "signed") -> QuantSpec:
    return QuantSpec(WEIGHT_ONLY[mode], block, symmetric, algo, grid)


def head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def embedding_name(model: nn.Module) -> str | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


@torch.no_grad()
def quantize_embedding(model: nn.Module, bits: int = 8, block: int = 32) -> dict | None:
    """Store the token-embedding table quantized (QuantEmbedding: int8 per row, or 4-bit blocks); a tied
    head keeps its own weight."""
    name = embedding_name(model)
    if name is None:
        return None
    emb = get_module(model, name)
    new = QuantEmbedding(emb.weight, emb.padding_idx, bits=bits, block=block).to(emb.weight.device)
    head = head_name(model)
    if head is not None and get_module(model, head).weight is emb.weight:  # untie: the head keeps its own copy
        h = get_module(model, head)
        h.weight = nn.Parameter(emb.weight.detach().clone())
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False
    set_module(model, name, new)
    return {"name": name, "bits": bits, "form": new.describe()["quant"]["table"],
            "bytes_before": tensor_bytes(emb.weight), "bytes_after": new.stored_bytes()}


def block_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """The targeted layers plus every nn.Linear inside the blocks that is not (embeddings, pooler, head excluded)."""
    names = list(targets)
    names += [n for n in find_targets(model, ("*",), DEFAULT_EXCLUDE) if n not in set(names)]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(set(names), key=lambda n: order.get(n, 0))


@torch.no_grad()
def quantize_model(model: nn.Module, targets: list[str], spec: QuantSpec, head: bool = False,
                   grams: dict[str, torch.Tensor] | None = None, embedding_bits: int = 8,
                   only_head: bool = False) -> QuantizeSummary:
    """Quantize in place; returns what was stored at which width and the bytes before/after.
    `only_head`: just the LM head and the embedding table (a method stored the block linears itself)."""
    summary = QuantizeSummary(asdict(spec))
    names = [] if only_head else block_linears(model, targets)
    hname = head_name(model) if head else None
    if hname is not None:
        names.append(hname)
        summary.head = hname
    if head:
        summary.embedding = quantize_embedding(model, embedding_bits, spec.block)
    for name in names:
        m = get_module(model, name)
        before = layer_bytes(m)
        if not isinstance(m, FactorizedLinear):
            if not isinstance(m, nn.Linear):
                continue
            m = DenseLinear(m.weight, m.bias).to(m.weight.device)
            set_module(model, name, m)
        done = m.apply_pending_quant_()  # a method's own choice of width first (quant-lowrank's correction)
        done += m.quantize_factors_(spec, gram=(grams or {}).get(name))
        if not done and not m.quantized():
            summary.kept_fp32.append(name)
        summary.layers.append(QuantizeLayer(name, m.kind, done, before, layer_bytes(m)))
    return summary


def apply_pending(model: nn.Module) -> int:
    """Store every factor a method left pending (see FactorizedLinear.pending); returns how many."""
    return sum(len(m.apply_pending_quant_()) for m in model.modules() if isinstance(m, FactorizedLinear))
