"""`dsformer`: W ~ D S, D dense (out x k), S (k x in) 2:4-sparse along `in` (DSFormer, arXiv 2312.13211).

1. k per layer: the largest k whose stored bytes (D dense + S as 2:4 values and 2-bit metadata)
   fit (1 - ratio) of the layer's dense bytes, capped at min(out, in).
2. Per-layer, task-unaware initialisation: truncated SVD (linalg.truncated_svd, balanced split),
   S projected to 2:4 by magnitude, then D refit by least squares given S on the calibration
   activations: min_D ||X (W - D S)^T|| => D (S G S^T) = W G S^T with G = X^T X.
3. Straight-Through Factorizer (`--stf-steps N`, 0 = stop after step 2): dense latent D and S;
   every forward uses project_24(S) while the gradient passes straight through the projection
   to the dense latent S. All layers' factors train JOINTLY with Adam on a distillation loss
   against the ORIGINAL model over the calibration windows: normalised MSE of the last hidden
   state (encoders) or KL of the next-token distributions (decoders; the frozen LM head turns the
   stored teacher hidden states back into logits, so only hidden states are kept, never logits).
   Teacher outputs are computed before any layer changes.
   STF runs through the package's one training loop (train/loop.py: AdamW without decay,
   constant lr, fixed seed). `--stf-checkpoint DIR` saves DIR/trainer.pt (latents, optimiser,
   RNG, step, loss history) every `--stf-save-every` steps and at the end; rerunning the same
   command resumes from it to the same result (a checkpoint written for a different
   model/ratio/targets/calibration/settings is refused).
The paper's exact STF update rule and block size were not found (METHODS.md); this is the
reading its abstract implies: projection in the forward, straight-through backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..base import CompressContext, CompressResult, LayerRecord, Method, MethodOption, register, replace_layer
from ..layers import DenseSparseLinear, project_24, sparse24_bytes, validate_24_layers
from ..grad import train_only
from ..objective import final_hidden, hidden_distillation, logit_kd
from ..linalg import output_error, truncated_svd
from ..targets import set_module
from ...errors import UserError
from ...progress import track
from ...train import TrainConfig, train
from ...train.checkpoint import check_state_folder

STF_STEPS = MethodOption("stf-steps", int, 200, "Straight-Through Factorizer steps (0 = per-layer SVD init only)", min=0)
STF_LR = MethodOption("stf-lr", float, 1e-4, "STF Adam learning rate on the latent factors", min=0.0, min_open=True)
STF_BATCH = MethodOption("stf-batch", int, 2, "calibration windows per STF step", min=1)
STF_CKPT = MethodOption("stf-checkpoint", str, None, "folder for the resumable STF checkpoint (trainer.pt)", path="out")
STF_SAVE_EVERY = MethodOption("stf-save-every", int, 25, "STF checkpoint interval in steps", min=1)


def dsformer_bytes(out_f: int, in_f: int, k: int, elem: int = 4) -> int:
    return out_f * k * elem + sparse24_bytes(k, in_f, elem)


def dsformer_rank(out_f: int, in_f: int, ratio: float, elem: int = 4) -> int:
    """Largest k (<= min(out, in)) with D + compressed-2:4 S within (1 - ratio) of the dense bytes."""
    budget = (1.0 - ratio) * out_f * in_f * elem
    k = min(math.floor(budget / (out_f * elem + in_f * (elem / 2 + 0.125))), min(out_f, in_f))
    while k > 0 and dsformer_bytes(out_f, in_f, k, elem) > budget:
        k -= 1
    return max(k, 0)


def refit_dense(W: torch.Tensor, S: torch.Tensor, G: torch.Tensor | None = None, ridge: float = 1e-4) -> torch.Tensor:
    """argmin_D ||X (W - D S)^T||_F given S (G = X^T X; identity G = plain Frobenius).

    A small ridge (relative to the mean diagonal of S G S^T) keeps D bounded when the calibration
    has fewer tokens than dimensions: otherwise D interpolates the calibration outputs exactly
    with huge entries, and the first STF step (which may flip a 2:4 choice) blows the loss up.
    """
    W64, S64 = W.detach().to(torch.float64), S.detach().to(torch.float64)
    GS = S64.T if G is None else G.to(torch.float64) @ S64.T  # in x k
    M = S64 @ GS  # k x k
    M = M + ridge * float(torch.diagonal(M).mean().clamp_min(1e-30)) * torch.eye(M.shape[0], dtype=M.dtype)
    rhs = (W64 @ GS).T  # k x out
    return torch.linalg.solve(M, rhs).T.to(W.dtype)


def init_factors(W: torch.Tensor, k: int, G: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Task-unaware init: balanced truncated SVD, S projected to 2:4, D refit given S."""
    f = truncated_svd(W, k, balanced=True)
    S = project_24(f.A)
    return refit_dense(W, S, G), S


class _STE24(torch.autograd.Function):
    """Forward: the 2:4 projection. Backward: identity (straight-through to the dense latent)."""

    @staticmethod
    def forward(ctx, S: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return project_24(S)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def ste_project_24(S: torch.Tensor) -> torch.Tensor:
    return _STE24.apply(S)


class STFLinear(nn.Module):
    """Training-time stand-in: dense latent D, S; forward uses project_24(S) (straight-through)."""

    def __init__(self, D: torch.Tensor, S: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.D = nn.Parameter(D.detach().clone())
        self.S = nn.Parameter(S.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, ste_project_24(self.S)), self.D, self.bias)

    def final(self) -> DenseSparseLinear:
        with torch.no_grad():
            return DenseSparseLinear(self.D, project_24(self.S), self.bias)


def distill_loss(loaded, model: nn.Module, batch: dict, h_t: torch.Tensor) -> torch.Tensor:
    """Decoders: KL of the next-token distributions; encoders: relative error of the last hidden state."""
    h_s = final_hidden(loaded, model, batch)
    if loaded.kind == "decoder":
        return logit_kd(model.get_output_embeddings(), h_s, h_t)
    return hidden_distillation(h_s, h_t)


@register
class DSFormerMethod(Method):
    name = "dsformer"
    summary = "DSFormer: W ~ dense D (out x k) x 2:4-sparse S (k x in); SVD init + joint Straight-Through Factorizer"
    options = (STF_STEPS, STF_LR, STF_BATCH, STF_CKPT, STF_SAVE_EVERY)
    needs_calibration = True
    blockwise = False  # STF trains every factor jointly, end to end: one unit at a time would be another method

    def check_options(self, options: dict) -> None:
        if options.get("stf_checkpoint"):
            check_state_folder(options["stf_checkpoint"], "--stf-checkpoint")

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        calib = ctx.require_calibration()
        loaded = calib.loaded
        steps = int(ctx.opt("stf_steps", 200))
        if steps < 0:
            raise UserError(f"--stf-steps must be >= 0, got {steps}", "pass 0 for the SVD init only, or e.g. 200")
        elem = next(model.parameters()).element_size()
        ks = {}
        for n in targets:
            o, i = model.get_submodule(n).weight.shape
            ks[n] = dsformer_rank(o, i, ctx.ratio, elem) if i % 4 == 0 else 0
        todo = [n for n in targets if ks[n] > 0]
        if not todo:
            raise UserError(f"--ratio {ctx.ratio} leaves no room for D x S in any layer", "use a smaller --ratio")
        grams = calib.grams(model, todo)

        # Teacher outputs from the ORIGINAL model, before any layer changes.
        batches, teacher = [], []
        if steps > 0:
            bs = max(1, int(ctx.opt("stf_batch", 2)))
            w = calib.windows()
            batches = [{k: v.to(ctx.device) for k, v in loaded.batch_from_ids(w[i:i + bs]).items()}
                       for i in range(0, len(w), bs)]
            with torch.no_grad():
                model.eval()
                teacher = [final_hidden(loaded, model, b).detach() for b in track(batches, "dsformer teacher outputs")]

        originals: dict[str, nn.Module] = {}
        stf: dict[str, STFLinear] = {}
        for name in track(todo, "dsformer init (SVD -> 2:4 -> LS refit)"):
            layer = model.get_submodule(name)
            W = layer.weight.detach().to(ctx.device)
            D, S = init_factors(W, ks[name], grams[name].to(ctx.device))
            originals[name] = layer
            stf[name] = STFLinear(D.to(layer.weight.dtype), S.to(layer.weight.dtype), layer.bias).to(layer.weight.device)
            set_module(model, name, stf[name])

        history: list[float] = []
        if steps > 0:
            history = self._train(model, loaded, stf, batches, teacher, steps, ctx, ks)

        records: list[LayerRecord] = []
        for name in targets:
            if name not in stf:
                records.append(replace_layer(model, name, None))
                continue
            final = stf[name].final()
            set_module(model, name, originals[name])  # so the record's "before" is the dense layer
            W = originals[name].weight.detach()
            G = grams[name]
            ref = output_error(W, torch.zeros_like(W), G)
            err = output_error(W, final.dense_weight(), G)
            records.append(replace_layer(model, name, final, {"output_rel_error": round(err / ref, 6) if ref else 0.0}))
        validate_24_layers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        notes = [f"k per layer from --ratio at stored bytes (D {elem}-byte dense + S 2:4 values + 2-bit metadata)",
                 f"STF: {steps} joint steps" + (f", distillation loss {history[0]:.4g} -> {history[-1]:.4g}" if history else
                                                " (task-unaware per-layer init only)")]
        return CompressResult(records, notes=notes, extra={"stf_steps": steps, "stf_loss_first_last": history[:1] + history[-1:],
                                                            "stf_loss_curve": [round(h, 5) for h in history[::max(1, len(history) // 20)]],
                                                            "k": {n: ks[n] for n in todo}})

    def _train(self, model: nn.Module, loaded, stf: dict[str, STFLinear], batches: list[dict], teacher: list[torch.Tensor],
               steps: int, ctx: CompressContext, ks: dict[str, int]) -> list[float]:
        """Joint STF through the package's one training loop (train/): constant lr, no clipping,
        resumable from --stf-checkpoint (trainer.pt)."""
        params = [p for m in stf.values() for p in (m.D, m.S)]
        lr = float(ctx.opt("stf_lr", 1e-4))
        calib_cfg = ctx.calibration.config
        signature = {"model": loaded.name, "ratio": ctx.ratio, "seed": ctx.seed, "batch": ctx.opt("stf_batch", 2),
                     "calib": [calib_cfg.n, calib_cfg.length, calib_cfg.seed, calib_cfg.text_file],
                     "k": {n: ks[n] for n in stf}}
        cfg = TrainConfig(steps=steps, lr=lr, warmup=0, min_lr_ratio=1.0, grad_clip=0.0, seed=ctx.seed, keep_best=False,
                          save_every=max(1, int(ctx.opt("stf_save_every", 25))), checkpoint=ctx.opt("stf_checkpoint"),
                          device=ctx.device, desc="STF (joint, straight-through)")
        with train_only(model, params):
            res = train(model, params, lambda m, item: distill_loss(loaded, m, item[0], item[1]),
                        list(zip(batches, teacher)), cfg, signature=signature)
        return res.losses
