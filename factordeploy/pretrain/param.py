"""Re-parametrise a freshly initialised model's block linears for pretraining.

* ``dense``: unchanged nn.Linear.
* ``sltrain`` (SLTrain, andyjm3/SLTrain): W = (alpha / r) B A + S; B = 0, A Kaiming-uniform, S on a
  FIXED uniformly random support of delta * out * in entries with values U(-1/sqrt(in), 1/sqrt(in)).
* ``lost`` (LOST, arXiv 2508.02668): SVD of the standard dense initialisation; the top-r triplets
  give B A (sqrt(S) on each side), the c = delta * in input channels with the largest residual
  column norms give W_s (the residual's columns); y = gamma * B A x + (1 - gamma) * W_s x_I, with the
  parts divided by gamma / (1 - gamma) so the initial W equals the SVD split of the dense init.
* ``lowrank``: W = B A from the top-r' SVD of the dense initialisation, r' chosen so each layer holds
  as many parameters as its SLTrain form (r (out + in) + delta * out * in): the equal-parameter
  low-rank-only baseline.
SLTrain and LOST hold the same parameters up to rounding: r (out + in) plus delta * out * in (S's
values) or c * out with c = round(delta * in) channels (W_s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..compress.layers import ChannelSparseLowRankLinear, LowRankLinear, SparsePlusLowRankLinear
from ..compress.linalg import split_factors, svd
from ..compress.targets import find_targets, set_module

PARAMS = ("dense", "lowrank", "sltrain", "lost")


@dataclass(frozen=True)
class ParamConfig:
    kind: str = "dense"
    rank: int = 64
    alpha: float = 32.0  # SLTrain
    delta: float = 0.03  # SLTrain density; LOST's channel fraction
    gamma: float = 0.5  # LOST


def _dense_init(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """nn.Linear's default initialisation (Kaiming-uniform, a = sqrt(5)), drawn from `gen`."""
    bound = 1.0 / math.sqrt(in_f)
    return (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound


def make_layer(layer: nn.Linear, cfg: ParamConfig, gen: torch.Generator) -> nn.Module:
    out_f, in_f = layer.out_features, layer.in_features
    bias = layer.bias.detach() if layer.bias is not None else None
    r = min(cfg.rank, out_f, in_f)
    if cfg.kind == "sltrain":
        A = _dense_init(r, in_f, gen)
        nnz = int(round(cfg.delta * out_f * in_f))
        idx = torch.randperm(out_f * in_f, generator=gen)[:nnz].sort().values
        val = (torch.rand(nnz, generator=gen) * 2 - 1) / math.sqrt(in_f)
        return SparsePlusLowRankLinear(A, torch.zeros(out_f, r), idx, val, bias, scale=cfg.alpha / r)
    U, S, Vh = svd(_dense_init(out_f, in_f, gen))
    if cfg.kind == "lowrank":
        r_eq = min(r + int(round(cfg.delta * out_f * in_f / (out_f + in_f))), min(out_f, in_f))
        A, B = split_factors(U, S, Vh, r_eq, balanced=True)
        return LowRankLinear(A.float(), B.float(), bias)
    if cfg.kind == "lost":
        A, B = split_factors(U, S, Vh, r, balanced=True)
        R = (U[:, r:] * S[r:]) @ Vh[r:]
        c = max(int(round(cfg.delta * in_f)), 1)
        I = torch.topk(R.norm(dim=0), c).indices.sort().values
        g = cfg.gamma
        return ChannelSparseLowRankLinear(A.float(), (B / g).float(), I, (R[:, I] / (1 - g)).float(), bias, gamma=g)
    raise ValueError(f"unknown parametrisation {cfg.kind}")


def reparametrize(model: nn.Module, cfg: ParamConfig, seed: int) -> list[str]:
    """Swap every block linear (attention and MLP; not embeddings / LM head) in place; returns their names."""
    if cfg.kind not in PARAMS:
        raise ValueError(f"unknown parametrisation {cfg.kind}")
    names = find_targets(model)
    if cfg.kind == "dense":
        return names
    gen = torch.Generator().manual_seed(seed)
    for n in names:
        set_module(model, n, make_layer(model.get_submodule(n), cfg, gen))
    return names


def densify(model: nn.Module, names: list[str]) -> None:
    """Replace each factorized layer by an nn.Linear holding its dense_weight() (for a plain HF folder)."""
    from ..compress.layers import FactorizedLinear, linear_from

    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, FactorizedLinear):
            shell = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            if m.bias is not None:
                shell.bias = m.bias
            with torch.no_grad():
                set_module(model, n, linear_from(shell, m.dense_weight().detach()))
