"""The recovery stage: distil the compressed model back toward the original, then merge adapters.

Runs after compression and before export, for every method (`--recover-steps N`, 0 = off).

Teacher = the original model, captured BEFORE compression as its last hidden state on every
training and selection window (decoders: after the final norm; the frozen, never-compressed LM
head turns it back into logits inside the loss). So no second model stays in memory and no
vocabulary-sized logits are stored: windows x length x hidden floats (256 x 128 x 576 x 4 B =
75 MB for SmolLM2). For a 7B model (hidden 4096) the same 256 x 2048-token set is 8.6 GB in
fp32: it would be written to disk per batch (a memmap, bf16 halves it) and read back per step,
while the student trains layer-sharded on the accelerator; the teacher never runs during
training.

Losses (compress/objective.py, shared with DSFormer's STF):
* decoders: T^2 * KL(p_teacher || p_student) per token at temperature T, + `hidden_weight` x
  relative squared error of the last hidden state;
* encoders: relative squared error of every token's last hidden state + (1 - cos) of the
  mean-pooled, L2-normalised sentence embedding (as 0.5 ||e_s - e_t||^2, which is exactly 0 at e_s = e_t) (the embedding the quality probe scores).
Both are exactly 0 when student == teacher.

Keep-best evaluation: the same loss on held-out windows of `text.selection_texts()` (pydoc
topics that no table reports and no step trains on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compress.layers import FactorizedLinear, layer_bytes, validate_24_layers
from ..compress.objective import final_hidden, hidden_distillation, logit_kd, pooled_embedding
from ..models.registry import LoadedModel
from ..progress import log, track
from ..train import TrainConfig, TrainHooks, train
from ..train.checkpoint import check_state_folder
from .adapters import ADAPTERS, AdapterConfig, attach, factors_of
from .data import RecoveryData, recovery_windows, selection_windows

# Measured on SmolLM2 / MiniLM (docs/recovery.md): the factors themselves need a small step
# (1e-4 wrecks SmolLM2's factors, docs/lowrank-methods.md); adapters start at zero and are
# scaled by their factor's RMS, so they take a larger one.
DEFAULT_LR = {("none", "decoder"): 1e-5, ("none", "encoder"): 1e-4}
DEFAULT_ADAPTER_LR = {"decoder": 1e-3, "encoder": 2e-3}


@dataclass
class RecoveryConfig:
    steps: int = 0
    adapter: str = "lora"
    rank: int = 8
    lr: float | None = None
    batch: int = 4
    data: str = "generated"
    checkpoint: str | None = None
    samples: int = 256  # training windows
    seq_len: int = 128
    temperature: float = 1.0
    hidden_weight: float = 0.0  # decoders: weight of the hidden-state term beside the logit KL
    eval_every: int = 0  # 0 = every steps // 10 steps
    eval_windows: int = 16
    accumulate: int = 1
    include_dense: bool = False
    warmup: float = 0.05
    seed: int = 0

    def learning_rate(self, kind: str) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[("none", kind)] if self.adapter == "none" else DEFAULT_ADAPTER_LR[kind]


def check_recovery_config(cfg: RecoveryConfig) -> None:
    """Reject bad recovery settings before any work (one named problem + fix each)."""
    from ..errors import UserError
    from .data import check_recover_data

    if cfg.adapter not in ADAPTERS:
        raise UserError(f"unknown --adapter '{cfg.adapter}'", "use one of " + ", ".join(ADAPTERS))
    if cfg.steps < 0 or cfg.rank < 1 or cfg.batch < 1 or cfg.samples < 1:
        raise UserError("--recover-steps must be >= 0 and --adapter-rank, --recover-batch >= 1",
                        "pass e.g. --recover-steps 200 --adapter-rank 8 --recover-batch 4")
    if cfg.lr is not None and cfg.lr <= 0:
        raise UserError(f"--recover-lr must be > 0, got {cfg.lr}", "pass e.g. --recover-lr 1e-3")
    if cfg.steps > 0:
        check_recover_data(cfg.data)
    if cfg.checkpoint:
        check_state_folder(cfg.checkpoint, "--recover-checkpoint")


@dataclass
class Teacher:
    """Training and selection batches with the original model's last hidden states."""

    train: list[tuple[dict[str, torch.Tensor], torch.Tensor]]
    select: list[tuple[dict[str, torch.Tensor], torch.Tensor]]
    data: RecoveryData
    seconds: float = 0.0


def distill_loss(loaded: LoadedModel, model: nn.Module, batch: dict[str, torch.Tensor], h_t: torch.Tensor,
                 cfg: RecoveryConfig) -> torch.Tensor:
    h_s = final_hidden(loaded, model, batch)
    mask = batch.get("attention_mask")
    if loaded.kind == "decoder":
        loss = logit_kd(model.get_output_embeddings(), h_s, h_t, cfg.temperature, mask)
        if cfg.hidden_weight:
            loss = loss + cfg.hidden_weight * hidden_distillation(h_s, h_t, mask)
        return loss
    e_s, e_t = pooled_embedding(h_s.float(), mask), pooled_embedding(h_t.float(), mask)
    return hidden_distillation(h_s, h_t, mask) + 0.5 * ((e_s - e_t) ** 2).sum(-1).mean()  # = 1 - cos, exact 0


@torch.no_grad()
def capture_teacher(loaded: LoadedModel, model: nn.Module, cfg: RecoveryConfig, device: str = "cpu") -> Teacher:
    """Build the data and run the ORIGINAL model once over it (call before compression)."""
    t0 = time.perf_counter()
    data = recovery_windows(loaded, cfg.data, cfg.samples, cfg.seq_len, cfg.seed, device)
    sel = selection_windows(loaded, cfg.eval_windows, cfg.seq_len, cfg.seed)
    model.eval()

    def run(windows: list[list[int]], what: str) -> list:
        out = []
        for i in track(range(0, len(windows), cfg.batch), what, total=-(-len(windows) // cfg.batch)):
            b = {k: v.to(device) for k, v in loaded.batch_from_ids(windows[i:i + cfg.batch]).items()}
            out.append((b, final_hidden(loaded, model, b).detach().float()))
        return out

    tr = run(data.windows, "recovery: teacher outputs (training windows)")
    se = run(sel, "recovery: teacher outputs (selection windows)")
    return Teacher(tr, se, data, round(time.perf_counter() - t0, 3))


@dataclass
class RecoveryReport:
    config: dict
    adapter: dict
    data: str
    train: dict
    seconds: float
    teacher_seconds: float
    bytes_unchanged: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"config": self.config, "adapter": self.adapter, "data": self.data, "train": self.train,
                "seconds": self.seconds, "teacher_seconds": self.teacher_seconds,
                "bytes_unchanged": self.bytes_unchanged, "notes": self.notes}


def recover(loaded: LoadedModel, model: nn.Module, teacher: Teacher, cfg: RecoveryConfig, device: str = "cpu",
            signature: dict[str, Any] | None = None, hooks: TrainHooks | None = None) -> RecoveryReport:
    """Train adapters (or the factors) by distillation, keep the best state, merge; the model's
    layers keep their kinds, stored bytes, 2:4 patterns and sparse supports."""
    from dataclasses import asdict

    t0 = time.perf_counter()
    before = {n: (type(m).__name__, layer_bytes(m)) for n, m in model.named_modules() if _is_linear(m)}
    aset = attach(model, AdapterConfig(cfg.adapter, cfg.rank, cfg.include_dense, cfg.seed))
    described = aset.describe()  # before the merge folds the adapters away
    lr = cfg.learning_rate(loaded.kind)
    every = cfg.eval_every or max(1, cfg.steps // 10)
    tcfg = TrainConfig(steps=cfg.steps, lr=lr, warmup=cfg.warmup, accumulate=cfg.accumulate, seed=cfg.seed,
                       eval_every=every, save_every=every, checkpoint=cfg.checkpoint, device=device,
                       desc=f"recovery ({cfg.adapter}, {loaded.kind} distillation)")
    user = hooks or TrainHooks()

    def before_forward(step: int) -> None:
        aset.perturb(step)
        if user.before_forward:
            user.before_forward(step)

    def after_backward(step: int) -> None:
        aset.restore(step)
        if user.after_backward:
            user.after_backward(step)

    def eval_fn(m: nn.Module) -> float:
        return sum(float(distill_loss(loaded, m, b, h, cfg)) for b, h in teacher.select) / len(teacher.select)

    sig = {"model": loaded.name, "adapter": cfg.adapter, "rank": cfg.rank, "data": teacher.data.source,
           "samples": cfg.samples, "seq_len": cfg.seq_len, "temperature": cfg.temperature,
           "hidden_weight": cfg.hidden_weight, **(signature or {})}
    try:
        res = train(model, aset.parameters(), lambda m, item: distill_loss(loaded, m, item[0], item[1], cfg),
                    teacher.train, tcfg, eval_fn, TrainHooks(before_forward, after_backward, user.after_step), sig)
    finally:
        aset.restore(-1)
    aset.merge()
    for p in model.parameters():
        p.requires_grad_(False)
    validate_24_layers(model)
    after = {n: (type(m).__name__, layer_bytes(m)) for n, m in model.named_modules() if _is_linear(m)}
    s = res.summary()
    log(f"recovery: {cfg.adapter} {res.steps} steps, loss {s.get('loss_first', float('nan')):.4g} -> "
        f"{s.get('loss_last', float('nan')):.4g}, held-out {res.eval_curve[0][1]:.4g} -> {res.best_eval:.4g} "
        f"(best step {res.best_step})" if res.eval_curve else "recovery: nothing to train")
    return RecoveryReport(asdict(cfg) | {"lr": lr, "eval_every": every}, described, teacher.data.source, s,
                          round(time.perf_counter() - t0, 3), teacher.seconds, before == after)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, FactorizedLinear))


__all__ = ["RecoveryConfig", "Teacher", "capture_teacher", "recover", "check_recovery_config", "distill_loss",
           "factors_of"]
