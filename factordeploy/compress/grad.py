"""Gradients for a chosen set of parameters only, with the model's own flags restored afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn


@contextmanager
def train_only(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of `model` except `params` for the block; then restore each
    parameter's requires_grad and drop the gradients (Fisher passes and fine-tuning share this)."""
    saved = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
