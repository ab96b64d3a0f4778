"""Block-wise reconstruction (`--reconstruct-steps N`, 0 = off): after a unit of blocks is
compressed (compress/sequential.py), fit its compressed parameters so that the unit, run on the
inputs the compressed prefix produces, matches the ORIGINAL unit's output on the original
prefix's inputs (BRECQ / OmniQuant's local objective; SVD-LLM's closed-form factor update).

Objective (the unit's *calibration error*): relative MSE sum ||f_c(X_s) - f_o(X_o)||^2 /
sum ||f_o(X_o)||^2 over every calibration batch. `--reconstruct-mix m` adds m x the same error
with the original inputs X_o fed to the compressed unit (training only).

1. Closed form first, per factorized layer, on the layer's own inputs: with x_s the layer input in
   the compressed unit (on X_s) and x_o the original layer's input (on X_o), G = x_s^T x_s (damped),
   C = x_s^T x_o, the least-squares refit toward the original layer's output x_o W^T of
   * LowRankLinear: B given A (linalg.refit_left);
   * Sparse24Linear: the kept values on the fixed 2:4 mask (linalg.support_lstsq with RG);
   * SparseDictLinear: the code values on their fixed support given D (the same, in atom space:
     features x D^T, metric D G D^T);
   other kinds skip this step. The refit is kept only if the unit's calibration error fell.
2. Then N gradient steps through THE training loop (train/loop.py: seeded, resumable with
   `--reconstruct-checkpoint DIR` (one sub-folder per unit), progress bar), training the factors
   themselves on their fixed supports / 2:4 masks (adapter `none`, recover/adapters.py) or an
   adapter merged exactly afterwards. The loop's evaluation is the calibration error itself, at
   step 0 and every N/5 steps, keep-best: so the result is never worse than the starting point.
3. Checked: the final calibration error is compared with the start; if it is higher (it cannot be
   by construction, but float round-off of a merge could), the unit's starting state is restored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.layers import FactorizedLinear, LowRankLinear, Sparse24Linear, SparseDictLinear, validate_24_layers
from ..compress.linalg import damped_gram, gram_factor, refit_left, support_lstsq
from ..compress.sequential import UnitData, run_blocks
from ..errors import UserError
from ..progress import log
from ..train import TrainConfig, TrainHooks, train
from ..train.checkpoint import check_state_folder
from .adapters import ADAPTERS, AdapterConfig, attach

DEFAULT_LR = {"none": 1e-4}
DEFAULT_ADAPTER_LR = 1e-3


@dataclass(frozen=True)
class ReconstructConfig:
    steps: int = 0
    lr: float | None = None
    mix: float = 0.0  # weight of the original-input term (training only)
    adapter: str = "none"
    rank: int = 8
    closed_form: bool = True
    eval_every: int = 0  # 0 = steps // 5
    checkpoint: str | None = None
    seed: int = 0

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.adapter, DEFAULT_ADAPTER_LR)


def check_reconstruct_config(cfg: ReconstructConfig) -> None:
    if cfg.steps < 0:
        raise UserError(f"--reconstruct-steps must be >= 0, got {cfg.steps}", "pass e.g. --reconstruct-steps 100 (0 = off)")
    if cfg.lr is not None and cfg.lr <= 0:
        raise UserError(f"--reconstruct-lr must be > 0, got {cfg.lr}", "pass e.g. --reconstruct-lr 1e-4")
    if not 0.0 <= cfg.mix <= 1.0:
        raise UserError(f"--reconstruct-mix must be within [0, 1], got {cfg.mix}", "pass e.g. --reconstruct-mix 0.25")
    if cfg.adapter not in ADAPTERS:
        raise UserError(f"unknown --reconstruct-adapter '{cfg.adapter}'", "use one of " + ", ".join(ADAPTERS))
    if cfg.checkpoint:  # a folder of per-unit trainer states: checked like --recover-checkpoint
        check_state_folder(cfg.checkpoint, "--reconstruct-checkpoint")


def _rel(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((y.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-30)


@torch.no_grad()
def calibration_error(unit: nn.Module, data: UnitData) -> float:
    """sum ||f_c(X_s) - f_o(X_o)||^2 / sum ||f_o(X_o)||^2 over every calibration batch."""
    num = den = 0.0
    for inp, t in zip(data.inputs, data.targets):
        y = run_blocks(unit, inp.hidden, inp)
        num += float(((y.double() - t.double()) ** 2).sum())
        den += float((t.double() ** 2).sum())
    return num / max(den, 1e-30)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@torch.no_grad()
def _layer_stats(data: UnitData, names: list[str], orig: dict[str, nn.Module], comp: dict[str, nn.Module]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[list[str]]]:
    """G = x_s^T x_s and C = x_s^T x_o of each named layer (float64, summed over every batch), and
    the layers grouped by shared input in the order the forward reaches them."""
    xs_in: dict[str, torch.Tensor] = {}
    xo_in: dict[str, torch.Tensor] = {}
    hs = [comp[n].register_forward_hook(lambda _m, a, _o, n=n: xs_in.__setitem__(n, a[0])) for n in names]
    hs += [orig[n].register_forward_hook(lambda _m, a, _o, n=n: xo_in.__setitem__(n, a[0])) for n in names]
    G: dict[str, torch.Tensor] = {}
    C: dict[str, torch.Tensor] = {}
    groups: list[list[str]] = []
    try:
        for bi, (inp, xo) in enumerate(zip(data.inputs, data.original_inputs)):
            run_blocks(data.original, xo, inp)
            run_blocks(data.compressed, inp.hidden, inp)
            seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
            for n in names:
                a, b = xs_in[n], xo_in[n]
                key = (id(a), id(b))
                if key not in seen:  # q/k/v read the same input: one product
                    s2 = a.reshape(-1, a.shape[-1]).double()
                    o2 = b.reshape(-1, b.shape[-1]).double()
                    seen[key] = (s2.T @ s2, s2.T @ o2)
                    if bi == 0:
                        groups.append([])
                if bi == 0:
                    groups[list(seen).index(key)].append(n)
                g, c = seen[key]
                G[n] = G[n] + g if n in G else g.clone()
                C[n] = C[n] + c if n in C else c.clone()
            xs_in.clear()
            xo_in.clear()
    finally:
        for h in hs:
            h.remove()
    return G, C, groups


@torch.no_grad()
def closed_form_refit(data: UnitData) -> dict[str, str]:
    """One least-squares refit of each factorized layer's free values toward the original layer (see doc),
    group of same-input layers after group in forward order, each on the inputs that the already refit
    earlier layers produce (refitting all at once double-corrects: a later layer would compensate an
    error that the refit of an earlier one removes)."""
    comp = {n: m for n, m in data.compressed.named_modules() if isinstance(m, FactorizedLinear)}
    orig = {n: data.original.get_submodule(n) for n in comp}
    todo = {n: m for n, m in comp.items() if isinstance(m, (LowRankLinear, Sparse24Linear, SparseDictLinear))
            and isinstance(orig[n], nn.Linear)}
    if not todo:
        return {}
    G, C, groups = _layer_stats(data, list(todo), orig, comp)  # first group's statistics + the forward order
    done: dict[str, str] = {}
    for gi, group in enumerate(groups):
        if gi:  # the inputs of this group changed with the refits before it
            G, C, _ = _layer_stats(data, group, orig, comp)
        for n in group:
            done[n] = _refit_layer(todo[n], orig[n].weight.detach().double(), G[n], C[n])
    return {n: v for n, v in done.items() if v}


def _refit_layer(m: nn.Module, W: torch.Tensor, G: torch.Tensor, C: torch.Tensor) -> str:
    Gd = damped_gram(gram_factor(G))
    if isinstance(m, LowRankLinear):
        m.B.copy_(refit_left(W, m.A, Gd, C).to(m.B.dtype))
        return "B given A"
    if isinstance(m, Sparse24Linear):
        idx = torch.nonzero(m.weight.detach().reshape(-1) != 0).squeeze(1)
        vals = support_lstsq(W, Gd, idx, RG=W @ C.T)
        new = torch.zeros_like(m.weight).reshape(-1)
        new[idx] = vals.to(new.dtype)
        m.weight.copy_(new.reshape(m.weight.shape))
        return "values on the 2:4 mask"
    # SparseDictLinear: the code values on their support given D, in atom space
    k = m.atoms
    idx = m.idx.long()  # s x out
    if bool((idx.sort(0).values[1:] == idx.sort(0).values[:-1]).any()):
        return ""  # an atom repeated in a code: not a plain support; left to the gradient step
    D = m.D.detach().double()
    Gk = D @ Gd @ D.T
    RGk = W @ C.T @ D.T  # out x k
    flat = (torch.arange(m.out_features)[None, :] * k + idx).reshape(-1)  # (t, o) order
    order = torch.argsort(flat)
    vals = support_lstsq(torch.zeros(m.out_features, k, dtype=torch.float64), Gk, flat[order], RG=RGk)
    out = torch.empty_like(vals)
    out[order] = vals
    m.val.copy_(out.reshape(idx.shape).to(m.val.dtype))
    return "codes given D"


class Reconstructor:
    """The `reconstruct` hook of compress/sequential.py (one call per unit)."""

    def __init__(self, cfg: ReconstructConfig, device: str = "cpu", signature: dict[str, Any] | None = None,
                 hooks: TrainHooks | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.signature = signature or {}
        self.hooks = hooks

    def __call__(self, data: UnitData) -> dict:
        cfg = self.cfg
        if cfg.steps <= 0:
            return {"steps": 0}
        t0 = time.perf_counter()
        unit = data.compressed
        e0 = calibration_error(unit, data)
        start = _snapshot(unit)
        info: dict[str, Any] = {"error_start": e0}
        if cfg.closed_form:
            refit = closed_form_refit(data)
            e1 = calibration_error(unit, data)
            kept = e1 < e0
            if not kept:
                unit.load_state_dict(start)
                e1 = e0
            info |= {"closed_form_layers": len(refit), "error_closed_form": e1, "closed_form_kept": kept}
        else:
            e1 = e0
        after_cf = _snapshot(unit)
        aset = attach(unit, AdapterConfig(cfg.adapter, cfg.rank, False, cfg.seed))
        every = cfg.eval_every or max(1, cfg.steps // 5)
        tcfg = TrainConfig(steps=cfg.steps, lr=cfg.learning_rate(), warmup=0.05, seed=cfg.seed + data.index,
                           eval_every=every, save_every=every, device=self.device,
                           checkpoint=str(Path(cfg.checkpoint) / f"unit{data.index}") if cfg.checkpoint else None,
                           desc=f"reconstruct unit {data.index} (blocks {data.block_indices[0]}-{data.block_indices[-1]})")
        items = list(zip(data.inputs, data.targets, data.original_inputs))

        def loss_fn(m: nn.Module, item) -> torch.Tensor:
            inp, t, xo = item
            loss = _rel(run_blocks(m, inp.hidden, inp), t)
            if cfg.mix > 0:
                loss = (1 - cfg.mix) * loss + cfg.mix * _rel(run_blocks(m, xo, inp), t)
            return loss

        sig = {"unit": data.index, "blocks": data.block_indices, "names": data.names, "config": asdict(cfg) | {"checkpoint": None},
               **self.signature}
        try:
            res = train(unit, aset.parameters(), loss_fn, items, tcfg, lambda m: calibration_error(m, data),
                        self.hooks, sig)
        finally:
            aset.restore(-1)
        aset.merge()
        for p in unit.parameters():
            p.requires_grad_(False)
        validate_24_layers(unit)
        e2 = calibration_error(unit, data)
        if e2 > e1:  # checked: never worse than where the gradient stage started
            unit.load_state_dict(after_cf)
            e2 = e1
        info |= {"error_end": e2, "steps": cfg.steps, "lr": tcfg.lr, "best_step": res.best_step,
                 "eval_curve": [[s, round(v, 6)] for s, v in res.eval_curve], "seconds": round(time.perf_counter() - t0, 2)}
        log(f"reconstruct unit {data.index}: calibration error {e0:.4g} -> closed form {e1:.4g} -> {e2:.4g} "
            f"({cfg.steps} steps, best step {res.best_step}, {info['seconds']:.0f}s)")
        return info


@dataclass(frozen=True)
class BlockwiseConfig:
    """--calib-mode and --reconstruct-*: how the compress stage walks the blocks."""

    calib_mode: str = "auto"  # auto = the method's default_calib_mode (data-free methods: original)
    reconstruct: ReconstructConfig = ReconstructConfig()

    def mode(self, method: Any, options: dict) -> str:
        if self.calib_mode != "auto":
            return self.calib_mode
        return method.default_calib_mode if method.uses_calibration(options) and method.blockwise else "original"

    def active(self, method: Any, options: dict) -> bool:
        """Whether the compress stage runs block-wise (else the method's own one-shot compress)."""
        return self.mode(method, options) == "sequential" or self.reconstruct.steps > 0

    def uses_calibration(self, method: Any, options: dict) -> bool:
        return method.uses_calibration(options) or self.active(method, options)


def check_blockwise(cfg: BlockwiseConfig, method: Any, options: dict) -> None:
    """Bad --calib-mode / --reconstruct-* combinations, before any work."""
    from ..compress.sequential import CALIB_MODES

    if cfg.calib_mode not in CALIB_MODES:
        raise UserError(f"unknown --calib-mode '{cfg.calib_mode}'", "use one of " + ", ".join(CALIB_MODES))
    check_reconstruct_config(cfg.reconstruct)
    if not method.blockwise and (cfg.calib_mode == "sequential" or cfg.reconstruct.steps > 0):
        raise UserError(f"method '{method.name}' fits all its layers jointly; --calib-mode sequential and "
                        "--reconstruct-steps do not apply to it", "drop those flags (or pick another method)")
    if cfg.calib_mode == "sequential" and not method.uses_calibration(options):
        raise UserError(f"method '{method.name}' uses no calibration statistics, so --calib-mode sequential changes nothing",
                        "drop --calib-mode (--reconstruct-steps N works with every method)")
