"""`sltrain`: W ~ B A + S with S unstructured sparse (SLTrain, arXiv 2406.02214) on a trained model.

SLTrain pretrains with S on a FIXED uniformly random support of delta * out * in entries. For an
already-trained model the low-rank part starts from whitened SVD and S is fitted to the whitened
residual on that support (`--support random`, the paper's), or on the residual's largest entries
(`--support largest`: |R_ij| * sqrt(G_jj), the entries whose removal costs most output error).
Bytes: A and B, S's values and its flat int32 indices; the rank takes what S leaves of the
layer's (1 - ratio) budget (compress/sparse_lowrank.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import CompressContext, MethodOption, register
from ..layers import SparsePlusLowRankLinear, flat_index_dtype
from ..linalg import balance_factors, support_lstsq
from ..sparse_lowrank import ALT_ITERS, SparseLowRankFit, SparseLowRankMethod, SparseStep



def nnz_for(out_f: int, in_f: int, delta: float) -> int:
    return max(int(round(delta * out_f * in_f)), 0)


def random_support(out_f: int, in_f: int, nnz: int, gen: torch.Generator) -> torch.Tensor:
    """SLTrain's support: nnz flat indices drawn uniformly without replacement, sorted."""
    return torch.randperm(out_f * in_f, generator=gen)[:nnz].sort().values


def largest_support(R: torch.Tensor, G: torch.Tensor, nnz: int) -> torch.Tensor:
    """The nnz entries of the residual with the largest |R_ij| * sqrt(G_jj), sorted."""
    score = R.abs() * G.diagonal().clamp_min(0).sqrt()[None, :]
    return torch.topk(score.reshape(-1), nnz).indices.sort().values


@register
class SLTrainMethod(SparseLowRankMethod):
    name = "sltrain"
    summary = "sparse + low-rank W ~ B A + S (SLTrain): whitened SVD plus S on a fixed support, fitted to the residual"
    options = (
        MethodOption("delta", float, 0.03, "fraction of W's entries held in S (SLTrain's delta)", min=0.0, max=0.5,
                     min_open=True),
        MethodOption("support", str, "random",
                     "S's support: uniformly random (the paper's) or the whitened residual's largest entries",
                     choices=("random", "largest")),
        ALT_ITERS,
    )

    def sparse_bytes(self, out_f: int, in_f: int, elem: int, ctx: CompressContext) -> int:
        idx_bytes = torch.empty(0, dtype=flat_index_dtype(out_f * in_f)).element_size()
        return nnz_for(out_f, in_f, ctx.opt("delta", 0.03)) * (elem + idx_bytes)

    def sparse_step(self, name: str, W: torch.Tensor, G: torch.Tensor, ctx: CompressContext,
                    gen: torch.Generator) -> SparseStep:
        out_f, in_f = W.shape
        nnz = nnz_for(out_f, in_f, ctx.opt("delta", 0.03))
        how = ctx.opt("support", "random")
        support = [random_support(out_f, in_f, nnz, gen).to(W.device)] if how == "random" else []

        def step(R: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            if not support:  # chosen once, from the first residual, then fixed
                support.append(largest_support(R, G, nnz))
            idx = support[0]
            val = support_lstsq(R, G, idx)
            S = torch.zeros(out_f * in_f, dtype=R.dtype, device=R.device).index_put_((idx,), val).view(out_f, in_f)
            return S, (idx, val)

        return step

    def make_layer(self, layer: nn.Linear, fit: SparseLowRankFit, ctx: CompressContext) -> nn.Module:
        A, B = balance_factors(fit.A, fit.B)
        idx, val = fit.payload
        dt = layer.weight.dtype
        return SparsePlusLowRankLinear(A.to(dt), B.to(dt), idx, val.to(dt), layer.bias)

    def describe_options(self, ctx: CompressContext) -> str:
        return f"delta {ctx.opt('delta', 0.03)}, {ctx.opt('support', 'random')} support"
