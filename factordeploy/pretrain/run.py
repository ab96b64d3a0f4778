"""One pretraining run: data, loss, evaluation, THE training loop, and the Hugging Face folder.

Training text: the calibration split of the packaged Wikipedia articles (models/text.py), tokenized
with SmolLM2's tokenizer into non-overlapping windows of `seq_len` tokens; the loop draws batches
in a seeded order per epoch (repeating epochs when --tokens exceeds the split). Evaluation: mean
next-token loss on fixed windows of each domain of models.text.domain_texts - wiki (the held-out
articles, in domain), news and pydoc (out of domain, never trained on); the loop evaluates wiki
every `eval_every` steps (the curve) and the final model is scored on all three.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..outdir import check_writable_folder
from ..models import text as textmod
from ..progress import log
from .arch import ARCHS, PRESETS, llama_config
from .param import PARAMS, ParamConfig, densify, reparametrize

DEFAULT_LR = {"dense": 1e-3, "lowrank": 1e-3, "sltrain": 3e-3, "lost": 1e-3}
DOMAINS = ("wiki", "news", "pydoc")


@dataclass
class PretrainConfig:
    out: str
    arch: str = "llama"
    params: str = "20M"
    param: str = "dense"
    tokens: int = 200_000
    seq_len: int = 128
    batch: int = 8
    lr: float | None = None  # default per parametrisation (DEFAULT_LR: the papers' 3e-3 for SLTrain)
    rank: int | None = None  # default: the preset's r
    alpha: float = 32.0
    delta: float = 0.03
    gamma: float = 0.5
    eval_windows: int = 16
    eval_every: int = 0  # 0 = about 8 points per run
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown --arch '{self.arch}'", f"use one of: {', '.join(ARCHS)}")
        if self.params not in PRESETS:
            raise UserError(f"unknown --params '{self.params}'", f"use one of: {', '.join(PRESETS)}")
        if self.param not in PARAMS:
            raise UserError(f"unknown --param '{self.param}'", f"use one of: {', '.join(PARAMS)}")
        if self.tokens < self.seq_len * self.batch:
            raise UserError(f"--tokens {self.tokens} is less than one batch ({self.batch} x {self.seq_len})",
                            "pass more --tokens or a smaller --batch / --seq-len")
        if not 0 < self.delta < 1 or not 0 < self.gamma < 1:
            raise UserError("--delta and --gamma must lie in (0, 1)", "use e.g. --delta 0.03 --gamma 0.5")
        preset = PRESETS[self.params]
        if self.rank is not None and self.rank > preset.hidden:
            raise UserError(f"--rank {self.rank} exceeds the width {preset.hidden} of the {self.params} preset",
                            f"pass --rank <= {preset.hidden} (default {preset.rank})")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {self.out} exists and is not empty", "choose a new folder or remove it")
        check_writable_folder(self.out, "--out")
        if self.checkpoint:
            check_writable_folder(self.checkpoint, "--checkpoint")


@dataclass
class PretrainResult:
    config: dict
    model_params: int  # every parameter of the trained model (embedding included)
    block_params: int  # parameters of the re-parametrised block linears
    trainable_params: int
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_memory_bytes: int
    peak_memory_kind: str
    train_state_bytes: int  # params + grads + AdamW's two moments, fp32: what the parametrisation saves
    eval_loss: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, wiki held-out loss)
    losses: list[float] = field(default_factory=list)


def windows(ids: list[int], length: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens from the start of one stream."""
    n = len(ids) // length if limit is None else min(limit, len(ids) // length)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def token_stream(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
    return ids


@torch.no_grad()
def mean_loss(model, batches: list[dict], device: str) -> float:
    """Token-weighted mean next-token loss over `batches`."""
    total, count = 0.0, 0
    for b in batches:
        ids = b["input_ids"].to(device)
        out = model(input_ids=ids, labels=ids)
        n = ids.numel() - ids.shape[0]
        total += float(out.loss) * n
        count += n
    return total / max(count, 1)


def _batches(wins: list[list[int]], bs: int) -> list[dict]:
    return [{"input_ids": torch.tensor(wins[i:i + bs], dtype=torch.long)} for i in range(0, len(wins) - bs + 1, bs)]


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ..models.registry import smollm2_fp32_folder
    from ..train import TrainConfig, train

    cfg.validate()
    tok = AutoTokenizer.from_pretrained(str(smollm2_fp32_folder()))
    train_wins = windows(token_stream(tok, textmod.calibration_articles()), cfg.seq_len)
    data = _batches(train_wins, cfg.batch)
    if not data:
        raise UserError("the training text is shorter than one batch", "use a smaller --batch or --seq-len")
    evals = {d: _batches(windows(token_stream(tok, textmod.domain_texts(d)), cfg.seq_len, cfg.eval_windows),
                         min(cfg.batch, cfg.eval_windows)) for d in DOMAINS}
    steps = math.ceil(cfg.tokens / (cfg.batch * cfg.seq_len))
    log(f"pretrain {cfg.param} ({cfg.params}): {steps} steps x {cfg.batch} x {cfg.seq_len} tokens; "
        f"training split {len(data) * cfg.batch * cfg.seq_len:,} tokens ({steps / len(data):.2f} epochs)")

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg.params, len(tok), cfg.seq_len)).to(torch.float32)
    pcfg = ParamConfig(cfg.param, cfg.rank or PRESETS[cfg.params].rank, cfg.alpha, cfg.delta, cfg.gamma)
    names = reparametrize(model, pcfg, cfg.seed)
    model.to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    block_params = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    lr = cfg.lr or DEFAULT_LR[cfg.param]
    every = cfg.eval_every or max(1, steps // 8)
    tcfg = TrainConfig(steps=steps, lr=lr, weight_decay=0.0, warmup=0.1, min_lr_ratio=0.1, grad_clip=1.0,
                       seed=cfg.seed, eval_every=every, keep_best=False, checkpoint=cfg.checkpoint,
                       device=cfg.device, desc=f"pretrain {cfg.param}")

    def loss_fn(m, batch):
        ids = batch["input_ids"].to(cfg.device)
        return m(input_ids=ids, labels=ids).loss

    t0 = time.perf_counter()
    res = train(model, params, loss_fn, data, tcfg, lambda m: mean_loss(m, evals["wiki"], cfg.device),
                signature={"pretrain": asdict(cfg) | {"checkpoint": None, "out": None}})
    model.eval()
    eval_loss = {d: round(mean_loss(model, b, cfg.device), 5) for d, b in evals.items()}
    trainable = sum(p.numel() for p in params)
    result = PretrainResult(
        config=asdict(cfg) | {"lr": lr, "rank": pcfg.rank, "eval_every": every}, model_params=sum(
            p.numel() for p in model.parameters()), block_params=block_params, trainable_params=trainable,
        steps=steps, tokens=res.tokens, seconds=round(time.perf_counter() - t0, 1), tokens_per_s=res.tokens_per_s,
        peak_memory_bytes=res.peak_memory_bytes, peak_memory_kind=res.peak_memory_kind,
        train_state_bytes=trainable * 4 * 4, eval_loss=eval_loss,
        perplexity={d: round(math.exp(v), 3) for d, v in eval_loss.items()},
        curve=[(int(s), round(float(v), 5)) for s, v in res.eval_curve], losses=[round(x, 5) for x in res.losses])
    save_folder(model, names, tok, result, Path(cfg.out))
    return result


def save_folder(model, names: list[str], tok, result: PretrainResult, out: Path) -> None:
    """A plain LlamaForCausalLM folder (factorized weights multiplied out) + tokenizer + pretrain.json,
    written to a temporary folder beside `out` and moved onto it only when complete."""
    densify(model, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.to("cpu").save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(asdict(result), indent=1))
        if out.exists():
            out.rmdir()  # validate() allowed only an empty folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
