"""`lost`: W ~ low-rank + a dense block on chosen input channels (LOST, arXiv 2508.02668).

y = gamma * (x A^T) B^T + (1 - gamma) * x[..., I] W_s^T. The low-rank part starts from whitened
SVD (the top singular directions in the calibration metric); I is the `--channel-frac` of input
channels whose whitened residual columns are largest (||R[:, j]|| * sqrt(G_jj), the output error
each channel leaves), and W_s is the least-squares fit of the residual on those channels
(linalg.channel_lstsq). gamma is the paper's fixed mixing weight: it is folded out of the fit
(B / gamma, W_s / (1 - gamma)), so the represented W does not depend on it.
Bytes: A, B, W_s (out x |I|), the int64 channel indices, and the two gamma scalars.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import CompressContext, MethodOption, register
from ..layers import ChannelSparseLowRankLinear
from ..linalg import balance_factors, channel_lstsq
from ..sparse_lowrank import ALT_ITERS, SparseLowRankFit, SparseLowRankMethod, SparseStep

INDEX_BYTES = 8  # int64: the width the exported Gather stores


def channels_for(in_f: int, frac: float) -> int:
    return max(int(round(frac * in_f)), 1) if frac > 0 else 0


def worst_channels(R: torch.Tensor, G: torch.Tensor, c: int) -> torch.Tensor:
    """The c input channels with the largest whitened residual column norms, sorted."""
    score = R.norm(dim=0) * G.diagonal().clamp_min(0).sqrt()
    return torch.topk(score, c).indices.sort().values


@register
class LOSTMethod(SparseLowRankMethod):
    name = "lost"
    summary = "low-rank + channel-wise sparse block on the worst-explained input channels (LOST)"
    options = (
        MethodOption("channel-frac", float, 0.05, "fraction of input channels given a dense block (LOST's channel sparsity)",
                     min=0.0, max=0.5, min_open=True),
        MethodOption("gamma", float, 0.5, "LOST's mixing weight: y = gamma * lowrank(x) + (1 - gamma) * channel part "
                     "(in (0, 1))", min=0.0, max=0.99, min_open=True),
        ALT_ITERS,
    )

    def sparse_bytes(self, out_f: int, in_f: int, elem: int, ctx: CompressContext) -> int:
        c = channels_for(in_f, ctx.opt("channel_frac", 0.05))
        return c * out_f * elem + c * INDEX_BYTES + 2 * elem  # (one scalar fewer on disk when gamma = 0.5)

    def sparse_step(self, name: str, W: torch.Tensor, G: torch.Tensor, ctx: CompressContext,
                    gen: torch.Generator) -> SparseStep:
        out_f, in_f = W.shape
        c = channels_for(in_f, ctx.opt("channel_frac", 0.05))
        chosen: list[torch.Tensor] = []

        def step(R: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            if not chosen:  # from the first (pure low-rank) residual, then fixed
                chosen.append(worst_channels(R, G, c))
            I = chosen[0]
            Ws = channel_lstsq(R, G, I)
            S = torch.zeros_like(R).index_copy_(1, I, Ws)
            return S, (I, Ws)

        return step

    def make_layer(self, layer: nn.Linear, fit: SparseLowRankFit, ctx: CompressContext) -> nn.Module:
        g = float(ctx.opt("gamma", 0.5))
        A, B = balance_factors(fit.A, fit.B)
        I, Ws = fit.payload
        dt = layer.weight.dtype
        return ChannelSparseLowRankLinear(A.to(dt), (B / g).to(dt), I, (Ws / (1 - g)).to(dt), layer.bias, gamma=g)

    def describe_options(self, ctx: CompressContext) -> str:
        return f"channel fraction {ctx.opt('channel_frac', 0.05)}, gamma {ctx.opt('gamma', 0.5)}"
