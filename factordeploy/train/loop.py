"""One training loop: AdamW, warmup + cosine, clipping, accumulation, periodic held-out
evaluation keeping the best state, and checkpoints that resume to the same result.

Built on `accelerate` so the same code runs under `accelerate launch` on several GPUs or
nodes (each process takes every world-size-th micro-batch; gradients are averaged by the
prepared model), with bf16 autocast on CUDA and fp32 on CPU.

Pluggable: `loss_fn(model, batch) -> scalar` (distillation for recovery and STF, next-token
loss for pretraining) and `batches` (a fixed, indexable data set). The order of batches is a
permutation of the data set per epoch drawn from (seed, epoch), so the data position is a
function of the step alone; a checkpoint stores the trained parameters, optimiser, scheduler,
RNG states, loss history, eval curve and best state, and resuming reproduces an uninterrupted
run bit for bit on the same machine (tests/test_train_loop.py).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..progress import is_quiet, log
from .checkpoint import load_state, rng_state, save_state, set_rng_state

LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[[nn.Module], float]


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of steps (< 1) or a step count (>= 1)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (1.0 = constant lr after warmup)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 = off
    accumulate: int = 1  # micro-batches per optimiser step
    seed: int = 0
    eval_every: int = 0  # 0 = evaluate only before and after training
    keep_best: bool = True  # restore the parameters of the best evaluation at the end
    save_every: int = 0  # 0 = only at the end (when checkpoint is set)
    checkpoint: str | None = None  # folder holding trainer.pt; rerunning resumes from it
    device: str = "cpu"
    desc: str = "train"

    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.steps))


@dataclass
class TrainHooks:
    """Optional calls around each micro-step (LoRA-GGPO perturbs frozen weights here)."""

    before_forward: Callable[[int], None] | None = None
    after_backward: Callable[[int], None] | None = None
    after_step: Callable[[int], None] | None = None  # after the optimiser step (e.g. a simulated kill in tests)


@dataclass
class TrainResult:
    steps: int
    start_step: int
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    best_eval: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    tokens_per_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    lr: float = 0.0
    skipped_microsteps: int = 0  # non-finite losses: their gradients were dropped

    def summary(self) -> dict:
        d = asdict(self)
        d["losses"] = [round(x, 6) for x in self.losses]
        d["eval_curve"] = [[s, round(v, 6)] for s, v in self.eval_curve]
        k = max(1, min(10, len(self.losses) // 4))
        if self.losses:
            d["loss_first"] = round(sum(self.losses[:k]) / k, 6)
            d["loss_last"] = round(sum(self.losses[-k:]) / k, 6)
        return d


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine from 1 to min_lr_ratio over the remaining steps."""
    warm, total = cfg.warmup_steps(), max(1, cfg.steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _batch_tokens(batch: Any) -> int:
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].numel())
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], dict):
        return _batch_tokens(batch[0])
    return 0


def peak_memory(device: str) -> tuple[int, str]:
    """Peak CUDA memory allocated by torch, else the process's peak resident set size."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024)), "process peak RSS (CPU)"


def _order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train(model: nn.Module, params: Sequence[nn.Parameter], loss_fn: LossFn, batches: Sequence[Any],
          cfg: TrainConfig, eval_fn: EvalFn | None = None, hooks: TrainHooks | None = None,
          signature: dict | None = None) -> TrainResult:
    """Train `params` (everything else must already be frozen) for cfg.steps optimiser steps.

    `signature`: what identifies this run (model, data, settings); a checkpoint written under
    another signature is refused instead of silently mixed in.
    """
    from accelerate import Accelerator

    hooks = hooks or TrainHooks()
    params = list(params)
    res = TrainResult(cfg.steps, 0, sum(p.numel() for p in params), lr=cfg.lr)
    if cfg.steps <= 0 or not params or not batches:
        return res
    on_cuda = cfg.device.startswith("cuda")
    acc = Accelerator(cpu=not on_cuda, mixed_precision="bf16" if on_cuda else "no",
                      gradient_accumulation_steps=max(1, cfg.accumulate))
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer if hasattr(opt, "optimizer") else opt, lr_lambda(cfg))
    sig = {"train": {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "save_every", "device", "desc")},
           "params": [list(p.shape) for p in params], "batches": len(batches), "run": signature or {}}
    best_state: list[torch.Tensor] | None = None
    start = 0
    if cfg.checkpoint:
        st = load_state(cfg.checkpoint, sig)
        if st is not None:
            with torch.no_grad():
                for p, v in zip(params, st["params"]):
                    p.copy_(v)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"])
            start = int(st["step"])
            res.losses = list(st["losses"])
            res.eval_curve = [tuple(x) for x in st["eval_curve"]]
            res.best_step, res.best_eval = int(st["best_step"]), st["best_eval"]
            res.tokens = int(st["tokens"])
            best_state = st["best"] or None
            log(f"{cfg.desc}: resumed from {cfg.checkpoint} at step {start}/{cfg.steps}")
    res.start_step = start

    def evaluate(step: int) -> None:
        nonlocal best_state
        if eval_fn is None:
            return
        was = model.training
        model.eval()
        with torch.no_grad(), acc.autocast():
            v = float(eval_fn(model))
        model.train(was)
        res.eval_curve.append((step, v))
        if res.best_eval is None or v < res.best_eval:
            res.best_eval, res.best_step = v, step
            best_state = [p.detach().clone() for p in params]

    def save(step: int) -> None:
        if not cfg.checkpoint:
            return
        save_state({"signature": sig, "step": step, "params": [p.detach().cpu() for p in params],
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                    "losses": res.losses, "eval_curve": [list(x) for x in res.eval_curve],
                    "best_step": res.best_step, "best_eval": res.best_eval, "tokens": res.tokens,
                    "best": [t.cpu() for t in best_state] if best_state is not None else []}, cfg.checkpoint)

    if start == 0:
        evaluate(0)
    accum, world, rank = max(1, cfg.accumulate), acc.num_processes, acc.process_index
    n = len(batches)
    t0, tok0 = time.perf_counter(), res.tokens
    model.eval()  # deterministic: no dropout (distillation against fixed teacher outputs)
    bar = None
    if not is_quiet() and acc.is_main_process:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"[factordeploy] {cfg.desc}", file=sys.stderr,
                   mininterval=1.0, leave=False)
    try:
        for step in range(start, cfg.steps):
            total = 0.0
            for micro in range(accum):
                pos = (step * accum + micro) * world + rank
                epoch, i = divmod(pos, n)
                batch = batches[_order(n, epoch, cfg.seed)[i]]
                with acc.accumulate(model):
                    if hooks.before_forward:
                        hooks.before_forward(step)
                    with acc.autocast():
                        loss = loss_fn(model, batch)
                    acc.backward(loss)
                    if hooks.after_backward:
                        hooks.after_backward(step)
                    if not torch.isfinite(loss.detach()):  # never let one bad batch poison the weights
                        res.skipped_microsteps += 1
                        for p in params:
                            p.grad = None
                    if acc.sync_gradients and cfg.grad_clip > 0:
                        acc.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                total += float(loss.detach()) / accum if torch.isfinite(loss.detach()) else 0.0
                res.tokens += _batch_tokens(batch) * world
            sched.step()
            res.losses.append(total)
            if hooks.after_step:
                hooks.after_step(step)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                evaluate(done)
            if bar is not None:
                dt = time.perf_counter() - t0
                post = {"loss": f"{total:.4f}", "tok/s": f"{(res.tokens - tok0) / max(dt, 1e-9):.0f}"}
                if res.eval_curve:
                    post["eval"] = f"{res.eval_curve[-1][1]:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save(done)
    finally:
        if bar is not None:
            bar.close()
    if start < cfg.steps or not res.eval_curve or res.eval_curve[-1][0] != cfg.steps:
        evaluate(cfg.steps)
    save(cfg.steps)
    if cfg.keep_best and best_state is not None and res.best_step != cfg.steps:
        with torch.no_grad():
            for p, v in zip(params, best_state):
                p.copy_(v.to(p.device))
        log(f"{cfg.desc}: kept the best evaluation (step {res.best_step}, {res.best_eval:.5g})")
    res.seconds = round(time.perf_counter() - t0, 3)
    res.tokens_per_s = round((res.tokens - tok0) / max(res.seconds, 1e-9), 1)
    res.peak_memory_bytes, res.peak_memory_kind = peak_memory(cfg.device)
    acc.free_memory()
    return res
