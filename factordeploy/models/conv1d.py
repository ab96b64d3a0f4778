"""GPT-2-family `Conv1D` projections become `nn.Linear`, so every method compresses them.

transformers' Conv1D (GPT-2, DistilGPT2, OpenAI GPT, ...) is a linear layer stored
transposed: y = x W + b with W of shape (in, out). nn.Linear stores W^T (out, in). The
conversion copies W^T and b exactly (no arithmetic on the values), so the model computes
the same function; compress/ then only ever sees nn.Linear.
"""

from __future__ import annotations

import torch
from torch import nn


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers Conv1D in `model` in place; returns the replaced module names."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        lin = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        lin.train(conv.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return names
