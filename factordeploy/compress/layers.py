"""The ONE vocabulary of factorized layers that every compression method emits.

Every layer is an ``nn.Module`` with the ``nn.Linear`` interface (``in_features``,
``out_features``, ``bias``, ``forward(x)`` over the last dimension) plus:

* ``dense_weight()``  - the (out x in) matrix it represents, for metrics and tests;
* ``stored_bytes()``  - every byte the deployed layer stores (weights, values, indices,
  metadata), bias excluded so ratios compare weight storage only;
* ``kind``            - a short tag used by export, passes and reports.

Methods add layer classes here (never elsewhere) so export/passes see one vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def dense_linear_bytes(layer: nn.Linear) -> int:
    """Stored weight bytes of a plain nn.Linear (bias excluded, like FactorizedLinear)."""
    return tensor_bytes(layer.weight)


class FactorizedLinear(nn.Module):
    """Base class: an nn.Linear replacement whose weight is stored in a factorized form."""

    kind: str = "factorized"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stored_bytes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """Per-layer facts for reports (shapes, rank, sparsity...)."""
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features}

    def extra_repr(self) -> str:
        d = self.describe()
        return ", ".join(f"{k}={v}" for k, v in d.items() if k != "kind")


class LowRankLinear(FactorizedLinear):
    """W ~ B @ A with A (r x in) and B (out x r); forward x -> (x A^T) B^T + b.

    Computed as two GEMMs so the exported graph keeps two rank-r MatMuls.
    """

    kind = "lowrank"

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"LowRankLinear needs A (r x in), B (out x r); got {tuple(A.shape)}, {tuple(B.shape)}")
        super().__init__(A.shape[1], B.shape[0], bias)
        self.A = nn.Parameter(A.detach().clone().contiguous())
        self.B = nn.Parameter(B.detach().clone().contiguous())

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.B @ self.A

    def stored_bytes(self) -> int:
        return tensor_bytes(self.A) + tensor_bytes(self.B)

    def describe(self) -> dict:
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features, "rank": self.rank}


def linear_from(layer: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A new dense nn.Linear with `weight` and the bias of `layer` (for methods that keep density)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


def layer_bytes(module: nn.Module) -> int:
    """Stored weight bytes of a dense or factorized linear."""
    if isinstance(module, FactorizedLinear):
        return module.stored_bytes()
    if isinstance(module, nn.Linear):
        return dense_linear_bytes(module)
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def describe_layer(module: nn.Module) -> dict:
    if isinstance(module, FactorizedLinear):
        return module.describe()
    return {"kind": "dense", "in": module.in_features, "out": module.out_features}
