"""The ONE vocabulary of factorized layers that every compression method emits.

Every layer is an ``nn.Module`` with the ``nn.Linear`` interface (``in_features``,
``out_features``, ``bias``, ``forward(x)`` over the last dimension) plus:

* ``dense_weight()``  - the (out x in) matrix it represents, for metrics and tests;
* ``stored_bytes()``  - every byte the deployed layer stores (weights, values, indices,
  metadata), bias excluded so ratios compare weight storage only;
* ``kind``            - a short tag for reports and node names (generic code never branches on it);
* ``graph_facts()``   - what generic graph code needs, in ``describe()`` (the layer manifest):
  ``weight_2to4`` = the [K, N] shape of the constant MatMul B that must stay 2:4 along K
  (passes/sparsity.py), ``custom_op`` = the custom op the layer emits (ops/).

Methods add layer classes here (never elsewhere) so export/passes see one vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import sparse_dict_matmul
from ..ops.export import emit


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
        """Per-layer facts for reports (shapes, rank, sparsity...) and the graph facts generic passes read."""
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features} | self.graph_facts()

    def graph_facts(self) -> dict:
        """Facts about the exported graph: {"weight_2to4": [K, N]} for a 2:4 constant, {"custom_op": name}."""
        return {}

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

    @torch.no_grad()
    def balance_(self) -> "LowRankLinear":
        """Rescale each rank component so A's row and B's column have equal norms (B @ A unchanged).

        Whitened factors come out as A = V^T L^-1 (entries ~1e-3) and B = U S (entries ~10);
        a uniform-step optimiser like Adam would move A by a large relative amount per step.
        """
        a, b = self.A.norm(dim=1), self.B.norm(dim=0)
        ok = (a > 0) & (b > 0)
        d = torch.where(ok, (b / torch.where(ok, a, torch.ones_like(a))).sqrt(), torch.ones_like(a))
        self.A.mul_(d[:, None])
        self.B.div_(d[None, :])
        return self

    def stored_bytes(self) -> int:
        return tensor_bytes(self.A) + tensor_bytes(self.B)

    def describe(self) -> dict:
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features, "rank": self.rank} | self.graph_facts()


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


# --- 2:4 semi-structured sparsity (issue 6) ------------------------------------------------
# In every group of 4 consecutive weights along the reduction (input) dimension at most 2 are
# nonzero. Storage is counted as the compressed form sparse tensor cores read: the 2 kept
# values per group (a group with fewer nonzeros still stores 2 slots) plus 2 bits of column
# index metadata per kept value.

SPARSE24_GROUP = 4
SPARSE24_KEEP = 2


def mask_24(scores: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 highest-scoring entries of each group of 4 along the last dim."""
    *lead, n = scores.shape
    if n % SPARSE24_GROUP:
        raise ValueError(f"2:4 needs the reduction dimension divisible by 4, got {n}")
    g = scores.reshape(*lead, n // SPARSE24_GROUP, SPARSE24_GROUP)
    idx = torch.topk(g, SPARSE24_KEEP, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return m.reshape(*lead, n)


def project_24(W: torch.Tensor) -> torch.Tensor:
    """Nearest 2:4 matrix in Frobenius norm: keep the 2 largest magnitudes of every group of 4."""
    return W * mask_24(W.detach().abs())


def violations_24(W: torch.Tensor, dim: int = -1) -> int:
    """Number of groups of 4 along `dim` holding more than 2 nonzeros (0 = valid 2:4)."""
    W = torch.as_tensor(W).movedim(dim, -1)
    n = W.shape[-1]
    if n % SPARSE24_GROUP:
        return -1
    nz = (W != 0).reshape(*W.shape[:-1], n // SPARSE24_GROUP, SPARSE24_GROUP).sum(-1)
    return int((nz > SPARSE24_KEEP).sum())


def check_24(W: torch.Tensor, where: str, dim: int = -1) -> None:
    """The vocabulary's validator: raise if W is not 2:4 along `dim` (on load and before export)."""
    v = violations_24(W, dim)
    if v == -1:
        raise ValueError(f"{where}: 2:4 dimension of size {W.shape[dim]} is not divisible by 4")
    if v:
        raise ValueError(f"{where}: {v} groups of 4 along dim {dim} have more than 2 nonzeros (not 2:4)")


def sparse24_bytes(rows: int, cols: int, elem: int) -> int:
    """Compressed 2:4 storage of a rows x cols matrix (2:4 along cols): values + 2-bit metadata."""
    kept = rows * cols // 2
    return kept * elem + -(-kept * 2 // 8)


class _Validated24(FactorizedLinear):
    """Base of the 2:4 layers: `validate()` checks the pattern, and every state-dict load runs it."""

    def validate(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch signature
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.validate()


class Sparse24Linear(_Validated24):
    """A dense-shaped weight (out x in) whose zeros form a 2:4 pattern along `in`.

    Exported as a plain MatMul whose constant B = W^T [in, out] is 2:4 along axis 0 (K), the
    axis TensorRT's sparse weights use. The pattern is checked on construction, on
    load_state_dict, and by `validate_24_layers(model)`, which the 2:4 methods call as their last
    step (right before the build exports); passes/sparsity.py re-checks the exported constants.
    """

    kind = "sparse24"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight = nn.Parameter(weight.detach().clone().contiguous())
        self.validate()

    def validate(self) -> None:
        check_24(self.weight, "Sparse24Linear weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def stored_bytes(self) -> int:
        return sparse24_bytes(self.out_features, self.in_features, self.weight.element_size())

    def describe(self) -> dict:
        nz = float((self.weight != 0).float().mean())
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features, "density": round(nz, 4)
                } | self.graph_facts()

    def graph_facts(self) -> dict:
        return {"weight_2to4": [self.in_features, self.out_features]}  # W^T [in, out], 2:4 along in


class DenseSparseLinear(_Validated24):
    """W ~ D @ S with D dense (out x k) and S (k x in) 2:4 along `in` (DSFormer).

    forward x -> (x S^T) D^T + b: two MatMuls; the first one's constant S^T [in, k] is 2:4
    along axis 0 (K). Stored bytes: D dense plus S in compressed 2:4 form.
    """

    kind = "densesparse"

    def __init__(self, D: torch.Tensor, S: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if D.dim() != 2 or S.dim() != 2 or D.shape[1] != S.shape[0]:
            raise ValueError(f"DenseSparseLinear needs D (out x k), S (k x in); got {tuple(D.shape)}, {tuple(S.shape)}")
        super().__init__(S.shape[1], D.shape[0], bias)
        self.D = nn.Parameter(D.detach().clone().contiguous())
        self.S = nn.Parameter(S.detach().clone().contiguous())
        self.validate()

    @property
    def k(self) -> int:
        return self.S.shape[0]

    def validate(self) -> None:
        check_24(self.S, "DenseSparseLinear S")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.S), self.D, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.D @ self.S

    def stored_bytes(self) -> int:
        return tensor_bytes(self.D) + sparse24_bytes(self.k, self.in_features, self.S.element_size())

    def describe(self) -> dict:
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features, "k": self.k} | self.graph_facts()

    def graph_facts(self) -> dict:
        return {"weight_2to4": [self.in_features, self.k]}  # S^T [in, k], 2:4 along in


def validate_24_layers(model: nn.Module) -> int:
    """Check the 2:4 pattern of every Sparse24Linear / DenseSparseLinear in `model`; returns how many."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, _Validated24):
            try:
                m.validate()
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
            n += 1
    return n

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
    one GEMM (4x faster than torch's CSR kernel here), under ONNX export the layer is one node
    of the custom op ``ops.sparse_dict_matmul``. ``D`` may be shared by several layers
    (``shared`` = how many), in which case each layer is charged its share of D's bytes.
    """

    kind = "sparse_dict"
    op = sparse_dict_matmul.SPEC

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
            y = emit(self.op, (x, self.D, self.idx, self.val),
                     {"k": self.atoms, "s": self.sparsity, "out_features": self.out_features})
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
        return d | self.graph_facts()

    def graph_facts(self) -> dict:
        return {"custom_op": self.op.name}
