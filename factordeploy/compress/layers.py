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


def index_dtype(k: int) -> torch.dtype:
    """Smallest integer dtype that can address `k` atoms (uint8 up to 256, then int16, int32)."""
    if k <= 256:
        return torch.uint8
    if k <= 2 ** 15:
        return torch.int16
    return torch.int32


class SparseDictLinear(FactorizedLinear):
    """CoSpaDi's sparse-dictionary layer: W ~ S @ D with a dense dictionary and sparse codes.

    * ``D``   (k x in): the dictionary; its k rows are atoms in the layer's input space;
    * ``idx`` (s x out), ``val`` (s x out): output neuron o is the combination
      ``sum_t val[t, o] * D[idx[t, o]]`` of exactly s atoms (S has s nonzeros per row).

    In the paper's notation (y = x W_p, W_p = W^T of shape in x out) this is W_p ~ D_p C with
    D_p = D^T (in x k) and C = S^T (k x out) column-sparse, s nonzeros per column: the
    orientation in which whitening by the input Gram is exact (see compress/dictlearn.py).

    forward: z = x D^T (k features), y[..., o] = sum_t val[t, o] z[..., idx[t, o]] (+ b).
    W is never formed; on CPU the s-sparse codes are scattered into a dense (out x k) S for
    one GEMM (4x faster than torch's CSR kernel here), under ONNX export the layer is one
    ``factordeploy::SparseDictMatMul`` node. ``D`` may be shared by several layers
    (``shared`` = how many), in which case each layer is charged its share of D's bytes.
    """

    kind = "sparse_dict"
    onnx_op = "SparseDictMatMul"
    onnx_domain = "factordeploy"

    def __init__(self, D: torch.Tensor | nn.Parameter, idx: torch.Tensor, val: torch.Tensor,
                 bias: torch.Tensor | None = None, shared: int = 1, group: str | None = None) -> None:
        if D.dim() != 2 or idx.shape != val.shape or idx.dim() != 2:
            raise ValueError(f"SparseDictLinear needs D (k x in), idx and val (s x out); got "
                             f"{tuple(D.shape)}, {tuple(idx.shape)}, {tuple(val.shape)}")
        k, in_f = D.shape
        s, out_f = idx.shape
        if s > k:
            raise ValueError(f"sparsity s={s} exceeds the number of atoms k={k}")
        super().__init__(in_f, out_f, bias)
        # A shared dictionary is passed as the same nn.Parameter to every layer of its group.
        self.D = D if isinstance(D, nn.Parameter) else nn.Parameter(D.detach().clone().contiguous())
        idx = idx.detach().long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
            raise ValueError("atom indices out of range")
        self.register_buffer("idx", idx.to(index_dtype(k)).contiguous())
        self.val = nn.Parameter(val.detach().clone().to(self.D.dtype).contiguous())
        self.shared = int(shared)
        self.group = group

    @property
    def atoms(self) -> int:
        return self.D.shape[0]

    @property
    def sparsity(self) -> int:
        return self.idx.shape[0]

    def codes(self) -> torch.Tensor:
        """The dense (out x k) code matrix S (for tests and the CPU forward; never W)."""
        S = torch.zeros(self.out_features, self.atoms, dtype=self.val.dtype, device=self.val.device)
        return S.scatter_add_(1, self.idx.T.long(), self.val.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            y = torch.onnx.ops.symbolic(
                f"{self.onnx_domain}::{self.onnx_op}", (x, self.D, self.idx, self.val),
                attrs={"k": self.atoms, "s": self.sparsity, "out_features": self.out_features},
                dtype=x.dtype, shape=(*x.shape[:-1], self.out_features), version=1)
            return y + self.bias if self.bias is not None else y
        return F.linear(F.linear(x, self.D), self.codes(), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.codes() @ self.D

    def own_bytes(self) -> int:
        """Bytes of this layer's codes: values plus indices at their real width."""
        return tensor_bytes(self.val) + tensor_bytes(self.idx)

    def stored_bytes(self) -> int:
        # Every byte counted once: a shared dictionary is split evenly over its layers.
        return self.own_bytes() + -(-tensor_bytes(self.D) // self.shared)

    def describe(self) -> dict:
        d = {"kind": self.kind, "in": self.in_features, "out": self.out_features, "atoms": self.atoms,
             "sparsity": self.sparsity, "index_dtype": str(self.idx.dtype).replace("torch.", "")}
        if self.shared > 1:
            d |= {"shared": self.shared, "group": self.group}
        return d
