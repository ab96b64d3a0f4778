"""Which nn.Linear layers a method compresses.

Default: every linear inside the transformer blocks (attention q/k/v/o and FFN);
embeddings, poolers and the LM head stay untouched unless the user asks for them.
"""

from __future__ import annotations

import fnmatch

from torch import nn

DEFAULT_EXCLUDE = ("*lm_head*", "*pooler*", "*embed*", "*classifier*", "*score*")


def find_targets(model: nn.Module, include: tuple[str, ...] = ("*",),
                 exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> list[str]:
    """Qualified names of the nn.Linear modules selected by glob patterns, in model order."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        if any(fnmatch.fnmatch(name, p) for p in include):
            names.append(name)
    return names


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
