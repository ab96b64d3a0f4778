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

from ..ops import quant_gather, quant_matmul, sparse_dict_matmul, sparse_matmul
from ..ops.export import emit
from .linalg import balance_factors
from .quant import QuantizedMatrix, QuantSpec, quant_bytes, quantize_rtn


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

    def _biased(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias if self.bias is not None else y

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

    # --- quantized factors (compress/quant.py): a property of each stored matrix ---------------
    #: the 2-D tensors this layer multiplies activations by as F.linear(x, W) weights (K = dim 1):
    #: the ones `quantize_factors_` may store as block-quantized codes
    matmul_factors: tuple[str, ...] = ()

    def quantized(self) -> dict[str, QuantizedMatrix]:
        q = self._modules.get("quant")
        return dict(q.items()) if q is not None else {}

    def qlinear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x -> x W^T for factor `name`; a quantized factor is one quantized-matmul node under ONNX export
        (its codes, not its dequantized values, reach the graph), its dequantized values in torch."""
        q = self.quantized().get(name)
        if q is not None and torch.onnx.is_in_onnx_export():
            return emit(quant_matmul.SPEC, (x, q.q, q.scale, q.zero),
                        {"bits": q.spec.bits, "block": q.spec.block, "symmetric": int(q.spec.symmetric)})
        return F.linear(x, getattr(self, name))

    def factor_bytes(self, name: str) -> int:
        """Stored bytes of one factor: its codes + scales (+ zeros) when quantized (or due to be, see
        `pending_quant`), else its tensor."""
        q = self.quantized().get(name)
        if q is not None:
            return q.stored_bytes()
        W = getattr(self, name)
        spec = self.pending().get(name)
        if spec is not None and QuantizedMatrix.saves_bytes(W, spec):
            return quant_bytes(W.shape[1], W.shape[0], spec)
        return tensor_bytes(W)

    def pending(self) -> dict[str, QuantSpec]:
        """Factors a method asked to store quantized once training is over (quant-lowrank's correction:
        recovery trains it at full precision first); `apply_pending_quant_` stores them."""
        return dict(getattr(self, "pending_quant", {}) or {})

    def apply_pending_quant_(self) -> list[str]:
        done = []
        for name, spec in self.pending().items():
            done += self.quantize_factors_(spec, (name,))
        self.pending_quant = {}
        return done

    def factor_gram(self, name: str, gram: torch.Tensor) -> torch.Tensor | None:
        """X^T X of factor `name`'s input given the layer input's `gram` (None: unknown; GPTQ then uses RTN)."""
        return gram

    @torch.no_grad()
    def quantize_factors_(self, spec: QuantSpec, names: tuple[str, ...] | None = None,
                          gram: torch.Tensor | None = None) -> list[str]:
        """Store factors `names` (default: every matmul factor not yet quantized) as block-quantized codes.

        The factor becomes a frozen buffer holding its dequantized values (so every torch computation
        sees what the deployed graph computes); the codes live in `self.quant[name]`. A factor whose
        quantized form would not be smaller (K shorter than a block) stays as it is. Returns the names."""
        done = []
        have = self.quantized()
        for name in names if names is not None else self.matmul_factors:
            if name in have:
                continue
            W = getattr(self, name).detach()
            if not QuantizedMatrix.saves_bytes(W, spec):
                continue
            g = self.factor_gram(name, gram) if gram is not None else None
            q = QuantizedMatrix.from_weight(W, spec, gram=g)
            if "quant" not in self._modules:
                self.quant = nn.ModuleDict()
            self.quant[name] = q
            deq = q.weight().to(W.dtype).contiguous()
            delattr(self, name)
            self.register_buffer(name, deq)
            done.append(name)
        return done

    def quant_facts(self) -> dict:
        q = {n: m.spec.tag for n, m in self.quantized().items()}
        q |= {n: s.tag + " (after training)" for n, s in self.pending().items() if n not in q}
        return {"quant": q} if q else {}


class LowRankLinear(FactorizedLinear):
    """W ~ B @ A with A (r x in) and B (out x r); forward x -> (x A^T) B^T + b.

    Computed as two GEMMs so the exported graph keeps two rank-r MatMuls.
    """

    kind = "lowrank"
    matmul_factors = ("A", "B")

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
        y = self.qlinear(self.qlinear(x, "A"), "B")
        return self._biased(y)

    def dense_weight(self) -> torch.Tensor:
        return self.B @ self.A

    def factor_gram(self, name: str, gram: torch.Tensor) -> torch.Tensor | None:
        if name == "B":  # B reads z = x A^T: Z^T Z = A G A^T
            A = self.A.detach().to(torch.float64)
            return A @ gram.to(torch.float64) @ A.T
        return gram

    @torch.no_grad()
    def balance_(self) -> "LowRankLinear":
        """Rescale each rank component so A's row and B's column have equal norms (B @ A unchanged).

        Whitened factors come out as A = V^T L^-1 (entries ~1e-3) and B = U S (entries ~10);
        a uniform-step optimiser like Adam would move A by a large relative amount per step.
        """
        A, B = balance_factors(self.A, self.B)
        self.A.copy_(A)
        self.B.copy_(B)
        return self

    def stored_bytes(self) -> int:
        return self.factor_bytes("A") + self.factor_bytes("B")

    def describe(self) -> dict:
        return ({"kind": self.kind, "in": self.in_features, "out": self.out_features, "rank": self.rank}
                | self.quant_facts() | self.graph_facts())


def linear_from(layer: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A new dense nn.Linear with `weight` and the bias of `layer` (for methods that keep density)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


def stored_model_bytes(model: nn.Module) -> int:
    """Every stored weight byte of a model: each factorized layer's `stored_bytes()` (+ its bias),
    every other parameter as it is (a quantized factor's dequantized buffer is not stored)."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, FactorizedLinear):
            total += m.stored_bytes() + (tensor_bytes(m.bias) if m.bias is not None else 0)
            seen.update(id(p) for p in m.parameters())
        elif isinstance(m, QuantEmbedding):
            total += m.stored_bytes()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += tensor_bytes(p)
    return total


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
    matmul_factors = ("weight",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight = nn.Parameter(weight.detach().clone().contiguous())
        self.validate()

    def validate(self) -> None:
        check_24(self.weight, "Sparse24Linear weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qlinear(x, "weight")
        return self._biased(y)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def stored_bytes(self) -> int:
        if self.quantized():  # the quantized graph stores dense codes (zeros are code 2^(b-1)): counted as stored
            return self.factor_bytes("weight")
        return sparse24_bytes(self.out_features, self.in_features, self.weight.element_size())

    def describe(self) -> dict:
        nz = float((self.weight != 0).float().mean())
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features, "density": round(nz, 4)
                } | self.quant_facts() | self.graph_facts()

    def graph_facts(self) -> dict:
        if self.quantized():  # the constant is QDQ codes now; the 2:4 pattern is checked in torch (validate)
            return {}
        return {"weight_2to4": [self.in_features, self.out_features]}  # W^T [in, out], 2:4 along in


class DenseSparseLinear(_Validated24):
    """W ~ D @ S with D dense (out x k) and S (k x in) 2:4 along `in` (DSFormer).

    forward x -> (x S^T) D^T + b: two MatMuls; the first one's constant S^T [in, k] is 2:4
    along axis 0 (K). Stored bytes: D dense plus S in compressed 2:4 form.
    """

    kind = "densesparse"
    matmul_factors = ("D", "S")

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
        y = self.qlinear(self.qlinear(x, "S"), "D")
        return self._biased(y)

    def dense_weight(self) -> torch.Tensor:
        return self.D @ self.S

    def factor_gram(self, name: str, gram: torch.Tensor) -> torch.Tensor | None:
        if name == "D":  # D reads z = x S^T
            S = self.S.detach().to(torch.float64)
            return S @ gram.to(torch.float64) @ S.T
        return gram

    def stored_bytes(self) -> int:
        s = (self.factor_bytes("S") if "S" in self.quantized()
             else sparse24_bytes(self.k, self.in_features, self.S.element_size()))
        return self.factor_bytes("D") + s

    def describe(self) -> dict:
        return ({"kind": self.kind, "in": self.in_features, "out": self.out_features, "k": self.k}
                | self.quant_facts() | self.graph_facts())

    def graph_facts(self) -> dict:
        if "S" in self.quantized():
            return {}
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
            return self._biased(y)
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


# --- sparse + low-rank (issue 14: SLTrain, LOST) ---------------------------------------------

def flat_index_dtype(numel: int) -> torch.dtype:
    """Storage dtype of flat indices into a matrix of `numel` entries.

    int32 up to 2^31 entries (every layer of a 7B model), else int64: the exported graph hands
    the indices to the sparse_matmul op node unchanged, so what is counted is what is on disk.
    """
    return torch.int32 if numel <= 2 ** 31 else torch.int64


class SparsePlusLowRankLinear(FactorizedLinear):
    """SLTrain's W = scale * B @ A + S with S unstructured sparse.

    * ``A`` (r x in), ``B`` (out x r): the low-rank factors (``scale`` = alpha / r in
      pretraining; 1.0 when a compression method folds it into B);
    * ``idx`` (nnz,): S's support as sorted flat row-major indices (o * in + i) at
      ``flat_index_dtype`` width; ``val`` (nnz,): its values.

    forward: one dense GEMM with W built on the fly (SLTrain's own forward: scatter S into B A,
    then one linear; gradients reach only A, B and the nnz values). Under ONNX export: two
    rank-r MatMuls plus one node of the custom op ``ops.sparse_matmul`` (x, idx, val) for S, so the
    artifact stores exactly the factors, the values and the flat indices.
    """

    kind = "sparse_lowrank"
    op = sparse_matmul.SPEC
    matmul_factors = ("A", "B")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                 bias: torch.Tensor | None = None, scale: float = 1.0) -> None:
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"SparsePlusLowRankLinear needs A (r x in), B (out x r); got {tuple(A.shape)}, {tuple(B.shape)}")
        if idx.dim() != 1 or idx.shape != val.shape:
            raise ValueError(f"idx and val must be 1-D of equal length; got {tuple(idx.shape)}, {tuple(val.shape)}")
        super().__init__(A.shape[1], B.shape[0], bias)
        numel = self.in_features * self.out_features
        idx = idx.detach().long()
        if idx.numel():
            if int(idx.min()) < 0 or int(idx.max()) >= numel:
                raise ValueError("flat indices out of range")
            if bool((idx[1:] <= idx[:-1]).any()):
                raise ValueError("flat indices must be sorted and unique")
        self.A = nn.Parameter(A.detach().clone().contiguous())
        self.B = nn.Parameter(B.detach().clone().contiguous())
        self.register_buffer("idx", idx.to(flat_index_dtype(numel)).contiguous())
        self.val = nn.Parameter(val.detach().clone().to(self.A.dtype).contiguous())
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nnz(self) -> int:
        return self.idx.numel()

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense (out x in) matrix (differentiable in `val`)."""
        S = torch.zeros(self.out_features * self.in_features, dtype=self.val.dtype, device=self.val.device)
        return S.scatter(0, self.idx.long(), self.val).view(self.out_features, self.in_features)

    def lowrank_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale if self.scale != 1.0 else self.B @ self.A

    def dense_weight(self) -> torch.Tensor:
        return self.lowrank_weight() + self.sparse_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            y = self.qlinear(self.qlinear(x, "A"), "B")
            if self.scale != 1.0:
                y = y * self.scale
            y = y + emit(self.op, (x, self.idx, self.val),
                         {"in_features": self.in_features, "out_features": self.out_features})
            return self._biased(y)
        return F.linear(x, self.dense_weight(), self.bias)

    def stored_bytes(self) -> int:
        scalar = self.A.element_size() if self.scale != 1.0 else 0  # the exported Mul's constant
        return (self.factor_bytes("A") + self.factor_bytes("B") + tensor_bytes(self.idx) + tensor_bytes(self.val)
                + scalar)

    def factor_gram(self, name: str, gram: torch.Tensor) -> torch.Tensor | None:
        if name == "B":
            A = self.A.detach().to(torch.float64)
            return A @ gram.to(torch.float64) @ A.T
        return gram

    def describe(self) -> dict:
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "nnz": self.nnz, "density": round(self.nnz / (self.in_features * self.out_features), 5),
                "index_dtype": str(self.idx.dtype).replace("torch.", "")} | self.quant_facts() | self.graph_facts()

    def graph_facts(self) -> dict:
        return {"custom_op": self.op.name}


class ChannelSparseLowRankLinear(FactorizedLinear):
    """LOST's y = gamma * (x A^T) B^T + (1 - gamma) * x[..., I] W_s^T (+ b).

    * ``A`` (r x in), ``B`` (out x r): the low-rank part;
    * ``channels`` (c,): the input-channel set I (sorted, unique), int64 - the width the
      exported ONNX Gather stores (c is a few percent of `in`, so this is a few hundred bytes);
    * ``Ws`` (out x c): the dense block on those channels.

    Exported as standard ONNX only: MatMul, MatMul for the low-rank part, Gather(x, I) +
    MatMul(W_s^T) for the channel part, two scalar Muls (gamma, 1 - gamma) and an Add. Every
    MatMul reads the activation, so constant folding can never rebuild the dense W.
    """

    kind = "channel_lowrank"
    matmul_factors = ("A", "B", "Ws")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, channels: torch.Tensor, Ws: torch.Tensor,
                 bias: torch.Tensor | None = None, gamma: float = 0.5) -> None:
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"ChannelSparseLowRankLinear needs A (r x in), B (out x r); got {tuple(A.shape)}, {tuple(B.shape)}")
        if channels.dim() != 1 or Ws.dim() != 2 or Ws.shape != (B.shape[0], channels.numel()):
            raise ValueError(f"Ws must be (out x |I|) = ({B.shape[0]} x {channels.numel()}); got {tuple(Ws.shape)}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
        super().__init__(A.shape[1], B.shape[0], bias)
        ch = channels.detach().long()
        if ch.numel():
            if int(ch.min()) < 0 or int(ch.max()) >= self.in_features:
                raise ValueError("channel indices out of range")
            if bool((ch[1:] <= ch[:-1]).any()):
                raise ValueError("channel indices must be sorted and unique")
        self.A = nn.Parameter(A.detach().clone().contiguous())
        self.B = nn.Parameter(B.detach().clone().contiguous())
        self.register_buffer("channels", ch.contiguous())
        self.Ws = nn.Parameter(Ws.detach().clone().to(self.A.dtype).contiguous())
        self.gamma = float(gamma)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def channel_weight(self) -> torch.Tensor:
        """W_s placed in its columns of a dense (out x in) matrix (differentiable in Ws)."""
        W = torch.zeros(self.out_features, self.in_features, dtype=self.Ws.dtype, device=self.Ws.device)
        return W.index_copy(1, self.channels, self.Ws)

    def dense_weight(self) -> torch.Tensor:
        return self.gamma * (self.B @ self.A) + (1.0 - self.gamma) * self.channel_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gamma * self.qlinear(self.qlinear(x, "A"), "B")
        y = y + (1.0 - self.gamma) * self.qlinear(x.index_select(-1, self.channels), "Ws")
        return self._biased(y)

    def stored_bytes(self) -> int:
        # + the scalar constants of the exported Muls: gamma and 1 - gamma (one constant when equal)
        scalars = len({self.gamma, 1.0 - self.gamma})
        return (self.factor_bytes("A") + self.factor_bytes("B") + tensor_bytes(self.channels) + self.factor_bytes("Ws")
                + scalars * self.A.element_size())

    def factor_gram(self, name: str, gram: torch.Tensor) -> torch.Tensor | None:
        G = gram.to(torch.float64)
        if name == "B":
            A = self.A.detach().to(torch.float64)
            return A @ G @ A.T
        if name == "Ws":
            I = self.channels.long()
            return G[I][:, I]
        return gram

    def describe(self) -> dict:
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "channels": int(self.channels.numel()), "gamma": self.gamma} | self.quant_facts() | self.graph_facts()


# --- dense and quantization-first layers (issue 20) ------------------------------------------

class DenseLinear(FactorizedLinear):
    """A dense weight kept as a stored factor, so it can be quantized like any other
    (an nn.Linear under `--quantize w4|w8`: untargeted linears, layers a method left dense, the LM head)."""

    kind = "dense_weight"
    matmul_factors = ("weight",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight = nn.Parameter(weight.detach().clone().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qlinear(x, "weight")
        return self._biased(y)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def stored_bytes(self) -> int:
        return self.factor_bytes("weight")

    def describe(self) -> dict:
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features} | self.quant_facts()


class QuantLowRankLinear(FactorizedLinear):
    """Low-rank-corrected quantization: W ~ Q_b(W - B A) + B A (LQER / ZeroQuant-V2's LoRC).

    * ``W`` (out x in): the residual, stored block-quantized (always: that is the form's point);
    * ``A`` (r x in), ``B`` (out x r): the correction, fitted on the calibration activations
      (compress/methods/quant_lowrank.py), stored at 8 bits or fp32.

    forward: x W^T + (x A^T) B^T + b; exported as the residual's quantized matmul plus two MatMuls, summed.
    """

    kind = "quant_lowrank"
    matmul_factors = ("W", "A", "B")

    def __init__(self, W: QuantizedMatrix, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(A.shape[1], B.shape[0], bias)
        if W.N != B.shape[0] or W.K != A.shape[1] or A.shape[0] != B.shape[1]:
            raise ValueError(f"QuantLowRankLinear needs W ({B.shape[0]} x {A.shape[1]}), A (r x in), B (out x r); "
                             f"got {W.N} x {W.K}, {tuple(A.shape)}, {tuple(B.shape)}")
        self.quant = nn.ModuleDict({"W": W})
        self.register_buffer("W", W.weight().to(A.dtype).contiguous())
        self.A = nn.Parameter(A.detach().clone().contiguous())
        self.B = nn.Parameter(B.detach().clone().contiguous())

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qlinear(x, "W") + self.qlinear(self.qlinear(x, "A"), "B")
        return self._biased(y)

    def dense_weight(self) -> torch.Tensor:
        return self.W + self.B @ self.A

    def factor_gram(self, name: str, gram: torch.Tensor) -> torch.Tensor | None:
        if name == "B":
            A = self.A.detach().to(torch.float64)
            return A @ gram.to(torch.float64) @ A.T
        return gram

    def stored_bytes(self) -> int:
        return self.factor_bytes("W") + self.factor_bytes("A") + self.factor_bytes("B")

    def describe(self) -> dict:
        return ({"kind": self.kind, "in": self.in_features, "out": self.out_features, "rank": self.rank}
                | self.quant_facts())


class QuantEmbedding(nn.Module):
    """A token-embedding table stored as signed codes with fp32 scales: 8 bits with one scale per row
    (absmax / 127), or 4 bits with one scale per `block` entries (ONNX Runtime's signed grid).

    `--quantize-head` stores it so (the table is a third of a small decoder's bytes and most of an
    encoder's file; `--embedding-bits` picks 8 or 4). forward: codes[ids] * scale[ids]; the file holds the
    codes (one node of ops/quant_gather under export: dequantize-then-gather for TensorRT,
    gather-then-dequantize for ONNX Runtime). Rows are looked up, never multiplied: per-row int8 moves
    each entry by at most half a step (1/254 of the row's largest entry). A tied LM head keeps its own
    weight (quantized, if at all, as a DenseLinear).
    """

    kind = "quant_embedding"

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None, bits: int = 8, block: int = 32) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"embedding bits must be 4 or 8, got {bits}")
        W = weight.detach().to(torch.float32)
        V, D = W.shape
        if bits == 8:
            block = D
            scale = W.abs().amax(1, keepdim=True) / 127.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round(W / scale).clamp(-127, 127)
        else:
            if D % block:
                raise ValueError(f"4-bit embedding blocks of {block} must divide the width {D}")
            spec = QuantSpec(4, block, True)
            q, sc, _ = quantize_rtn(W.T.contiguous(), spec)  # K = D: blocks along each row
            codes = q.T.to(torch.int16) - 8
            scale = sc.T.contiguous()
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(weight.dtype).contiguous())
        self.num_embeddings, self.embedding_dim = V, D
        self.bits, self.block = bits, block
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (what every lookup returns)."""
        return quant_gather.dequantize_rows(self.codes, self.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return emit(quant_gather.SPEC, (self.codes, self.scale, ids.to(torch.int64)),
                        {"bits": self.bits, "block": self.block})
        return quant_gather.dequantize_rows(self.codes[ids], self.scale[ids])

    def stored_bytes(self) -> int:
        return self.codes.numel() * self.bits // 8 + tensor_bytes(self.scale)

    def describe(self) -> dict:
        tag = "int8 per row" if self.bits == 8 else f"w4g{self.block}"
        return {"kind": self.kind, "rows": self.num_embeddings, "dim": self.embedding_dim, "quant": {"table": tag}}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + self.describe()["quant"]["table"]
