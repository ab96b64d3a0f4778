"""Adapters on the trainable factors of every factorized layer, merged exactly before export.

A *factor* is one stored tensor of a layer: LowRankLinear's A and B, SparseDictLinear's
dictionary D and code values `val` (their support `idx` is a buffer and never changes),
Sparse24Linear's kept values (the update is multiplied by the 2:4 mask), DenseSparseLinear's
D and S (S's update masked the same way), SparsePlusLowRankLinear's A, B and the values of S on
its fixed support (`idx` is a buffer), ChannelSparseLowRankLinear's A, B and its dense channel
block W_s (the channel set is a buffer), and optionally plain nn.Linear weights left dense
(never the LM head: it turns cached teacher hidden states into logits).

Each adapter is a `torch.nn.utils.parametrize` parametrization of its factor,
F_eff = F + mask * delta, so the layer classes (and their export code) are untouched and the
same adapter code serves every layer kind. A dictionary shared by several layers gets ONE
adapter object registered on each of them. `merge()` writes F + mask * delta into the original
parameter and removes the parametrization: stored bytes, layer kinds, the 2:4 pattern and the
sparse supports stay as they were (tests/test_recovery.py checks each kind).

Kinds:
* `none`: the factors themselves train (2:4 factors through a masked gradient); LowRankLinear
  factors are balanced first so Adam's per-element step suits both.
* A 1-D factor (SLTrain's S values, nnz of them: a few percent of the layer) gets a full update
  vector delta = s * v (v zero-initialised) under every adapter kind: a low-rank or wavelet
  structure means nothing for a list of values, and v is already small.
* `lora`: delta = s * B A, B (m x r) zero-initialised, A (r x n) ~ N(0, 1/n); s = RMS of the
  factor at attach time, so one learning rate suits factors of very different scales (whitened
  A ~ 1e-3 next to B ~ 10). `peft` is not used: its LoRA wraps whole nn.Linear/Conv modules and
  adds an adapter to their *input->output map*, while here the update must live inside each
  stored factor (and under a 2:4 mask or a fixed sparse support) to merge without changing
  the layer's form.
* `lora-ggpo`: LoRA plus LoRA-GGPO's gradient-guided perturbation of the frozen factors (see
  GGPO below).
* `wara`: WaRA's update learned in a wavelet domain: single-level 2-D Haar DWT coefficients
  (LL, LH, HL, HH, each ceil(m/2) x ceil(n/2)), each subband a rank-r/2 product B_k A_k, and the
  inverse DWT (ptwt.waverec2, differentiable) gives delta. Haar because it is orthogonal (the
  update's energy equals its coefficients' energy, so the same learning rate suits it), has
  no boundary effects on even sizes, and one level is the reading of the paper's d/2 shapes;
  r/2 per subband gives exactly LoRA-rank-r's parameter count (4 * r/2 * (m+n)/2 = r (m+n)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compress.layers import (ChannelSparseLowRankLinear, DenseLinear, DenseSparseLinear, FactorizedLinear, LowRankLinear,
                               QuantLowRankLinear,
                               Sparse24Linear, SparseDictLinear, SparsePlusLowRankLinear)

ADAPTERS = ("none", "lora", "lora-ggpo", "wara")
GGPO_MAX_REL = 5.0


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"
    rank: int = 8
    include_dense: bool = False  # also adapt nn.Linear layers left dense (never the LM head)
    seed: int = 0
    ggpo_sigma: float = 0.03  # LoRA-GGPO: weight-norm term of the perturbation scale
    ggpo_beta: float = 0.01  # LoRA-GGPO: squared-gradient-norm term


@dataclass
class Factor:
    """One trainable stored tensor: owners are (module, attribute) pairs sharing that Parameter."""

    owners: list[tuple[nn.Module, str]]
    param: nn.Parameter
    mask: torch.Tensor | None  # 2:4 factors: the update is multiplied by it
    kind: str


def factors_of(model: nn.Module, include_dense: bool = False) -> list[Factor]:
    """Every trainable factor of every factorized layer (shared parameters listed once)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[int, Factor] = {}
    for m in model.modules():
        items: list[tuple[str, bool]] = []
        if isinstance(m, LowRankLinear):
            items = [("A", False), ("B", False)]
        elif isinstance(m, SparseDictLinear):
            items = [("D", False), ("val", False)]
        elif isinstance(m, Sparse24Linear):
            items = [("weight", True)]
        elif isinstance(m, DenseSparseLinear):
            items = [("D", False), ("S", True)]
        elif isinstance(m, SparsePlusLowRankLinear):
            items = [("A", False), ("B", False), ("val", False)]
        elif isinstance(m, ChannelSparseLowRankLinear):
            items = [("A", False), ("B", False), ("Ws", False)]
        elif isinstance(m, (QuantLowRankLinear, DenseLinear)):
            items = [("A", False), ("B", False)] if isinstance(m, QuantLowRankLinear) else [("weight", False)]
        elif include_dense and isinstance(m, nn.Linear) and m is not head and not isinstance(m, FactorizedLinear):
            items = [("weight", False)]
        if isinstance(m, FactorizedLinear):  # quantized factors are frozen codes: adapters train the rest
            frozen = m.quantized()
            items = [(n, k) for n, k in items if n not in frozen]
        for name, masked in items:
            p = m._parameters[name] if name in m._parameters else getattr(m, name)
            kind = getattr(m, "kind", "dense")
            if id(p) in found:
                found[id(p)].owners.append((m, name))
            else:
                found[id(p)] = Factor([(m, name)], p, (p.detach() != 0) if masked else None, kind)
    return list(found.values())


class _Delta(nn.Module):
    """Base parametrization: F -> F + mask * delta(); also holds LoRA-GGPO's gradient statistics."""

    def __init__(self, like: torch.Tensor, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)
        rms = float(like.detach().float().pow(2).mean().sqrt())
        self.scale = rms if rms > 0 else 1.0
        self.capture = False
        self.grad_sq_rows: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def masked_delta(self) -> torch.Tensor:
        d = self.delta()
        return d * self.mask if self.mask is not None else d

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        out = X + self.masked_delta().to(X.dtype)
        if self.capture and out.requires_grad:
            out.register_hook(self._record)
        return out

    def _record(self, g: torch.Tensor) -> None:
        sq = g.detach().float().pow(2).sum(-1)
        self.grad_sq_rows = sq if self.grad_sq_rows is None else self.grad_sq_rows + sq


class LoRADelta(_Delta):
    def __init__(self, like: torch.Tensor, rank: int, gen: torch.Generator, mask: torch.Tensor | None = None) -> None:
        super().__init__(like, mask)
        m, n = like.shape
        r = max(1, min(rank, m, n))
        self.A = nn.Parameter(torch.randn(r, n, generator=gen).div_(math.sqrt(n)).to(like.dtype))
        self.B = nn.Parameter(torch.zeros(m, r, dtype=like.dtype))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


class VectorDelta(_Delta):
    """A 1-D factor's update: delta = s * v, v zero-initialised (the values of a fixed sparse support)."""

    def __init__(self, like: torch.Tensor, rank: int, gen: torch.Generator, mask: torch.Tensor | None = None) -> None:
        super().__init__(like, mask)
        self.v = nn.Parameter(torch.zeros_like(like))

    def delta(self) -> torch.Tensor:
        return self.scale * self.v


class WaRADelta(_Delta):
    """Low-rank per subband of a one-level 2-D Haar DWT; delta = IDWT(coefficients) (ptwt)."""

    wavelet = "haar"

    def __init__(self, like: torch.Tensor, rank: int, gen: torch.Generator, mask: torch.Tensor | None = None) -> None:
        super().__init__(like, mask)
        self.shape = tuple(like.shape)
        m2, n2 = -(-self.shape[0] // 2), -(-self.shape[1] // 2)
        r = max(1, min(max(1, rank // 2), m2, n2))
        self.A = nn.Parameter(torch.randn(4, r, n2, generator=gen).div_(math.sqrt(n2)).to(like.dtype))
        self.B = nn.Parameter(torch.zeros(4, m2, r, dtype=like.dtype))

    def delta(self) -> torch.Tensor:
        import ptwt

        c = torch.bmm(self.B, self.A).unsqueeze(1)  # 4 subbands x 1 x m2 x n2
        full = ptwt.waverec2((c[0], (c[1], c[2], c[3])), self.wavelet)[0]
        return self.scale * full[: self.shape[0], : self.shape[1]]


@dataclass
class AdapterSet:
    """The adapters attached to a model: their parameters, GGPO hooks, and the exact merge."""

    config: AdapterConfig
    factors: list[Factor]
    deltas: list[_Delta | None] = field(default_factory=list)
    _saved: list[torch.Tensor] = field(default_factory=list)
    _grad_hooks: list = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        if self.config.kind == "none":
            return [f.param for f in self.factors]
        return [p for d in self.deltas if d is not None for p in d.parameters()]

    def describe(self) -> dict:
        kinds: dict[str, int] = {}
        for f in self.factors:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        return {"adapter": self.config.kind, "rank": self.config.rank if self.config.kind != "none" else None,
                "factors": len(self.factors), "factors_by_layer_kind": kinds,
                "trainable_params": sum(p.numel() for p in self.parameters()),
                "wavelet": "haar, 1 level (ptwt)" if self.config.kind == "wara" else None}

    # --- LoRA-GGPO ---------------------------------------------------------------------------
    def perturb(self, step: int) -> None:
        """Add the GGPO noise to every frozen factor (its exact values saved for `restore`).

        Per output row i of a factor W: n_i ~ N(0, I) * ||W_i|| (sigma + beta ||g_i||^2 / mean_j ||g_j||^2) / sqrt(cols),
        g = the gradient w.r.t. the adapted factor from the previous backward (0 at step 0), so the
        noise is larger where the weights are large and where the loss is sharp. The public port's
        absolute beta ||g_i||^2 has units of gradient^2: on MiniLM's factors it reached O(100) and
        the perturbed forward overflowed to NaN (measured), so the gradient term is taken relative
        to the factor's mean (capped at GGPO_MAX_REL = 5: a row's noise stays below 8% of its norm)
        and scales the row's weight norm.
        """
        if self.config.kind != "lora-ggpo":
            return
        gen = torch.Generator().manual_seed(self.config.seed * 7919 + step)
        self._saved = []
        with torch.no_grad():
            for f, d in zip(self.factors, self.deltas):
                W = f.param
                self._saved.append(W.detach().clone())
                rows = W.detach().float().reshape(-1, W.shape[-1]).norm(dim=-1)  # a 1-D factor is one row
                g2 = d.grad_sq_rows if d is not None and d.grad_sq_rows is not None else torch.zeros_like(rows)
                g2 = (g2.to(rows.device) / g2.mean().clamp_min(1e-30)).clamp_max(GGPO_MAX_REL)
                scale = rows * (self.config.ggpo_sigma + self.config.ggpo_beta * g2) / math.sqrt(W.shape[-1])
                noise = (torch.randn(rows.numel(), W.shape[-1], generator=gen).to(W.device, torch.float32)
                         * scale[:, None]).reshape(W.shape)
                if f.mask is not None:
                    noise = noise * f.mask
                W.add_(noise.to(W.dtype))
                if d is not None:
                    d.grad_sq_rows = None
                    d.capture = True

    def restore(self, step: int) -> None:
        """Put the exact pre-perturbation values back (bit-identical), before the optimiser step."""
        if self.config.kind != "lora-ggpo" or not self._saved:
            return
        with torch.no_grad():
            for f, saved in zip(self.factors, self._saved):
                f.param.copy_(saved)
        self._saved = []

    # --- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into its factor and restore the plain layer classes."""
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []
        for f, d in zip(self.factors, self.deltas):
            if d is None:
                continue
            new = f.param.detach() + d.masked_delta().to(f.param.dtype)
            for m, name in f.owners:
                parametrize.remove_parametrizations(m, name, leave_parametrized=False)
            f.param.copy_(new)
        self.deltas = [None] * len(self.factors)
        for f in self.factors:
            f.param.requires_grad_(False)


def attach(model: nn.Module, cfg: AdapterConfig) -> AdapterSet:
    """Attach adapters (or, for `none`, unfreeze the factors themselves); everything else frozen."""
    if cfg.kind not in ADAPTERS:
        raise ValueError(f"unknown adapter {cfg.kind!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    fs = factors_of(model, cfg.include_dense)
    aset = AdapterSet(cfg, fs)
    if cfg.kind == "none":
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.balance_()
        for f in fs:
            f.param.requires_grad_(True)
            if f.mask is not None:
                mask = f.mask
                aset._grad_hooks.append(f.param.register_hook(lambda g, mask=mask: g * mask))
        aset.deltas = [None] * len(fs)
        return aset
    gen = torch.Generator().manual_seed(cfg.seed)
    cls = WaRADelta if cfg.kind == "wara" else LoRADelta
    for f in fs:
        d = (VectorDelta if f.param.dim() == 1 else cls)(f.param.detach(), cfg.rank, gen, f.mask).to(f.param.device)
        for m, name in f.owners:
            parametrize.register_parametrization(m, name, d, unsafe=True)
        aset.deltas.append(d)
    return aset
