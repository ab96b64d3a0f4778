"""Text generation with a KV cache: a prefill over the prompt, then one cached step per token.

The loop is runtime-agnostic (serve/runners.py): the same code drives ONNX Runtime on a
built folder and the torch model, so greedy outputs can be compared token by token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..export.kv_cache import step_inputs
from ..models.checks import load_tokenizer
from ..models.registry import _quiet_transformers
from .runners import OrtStepRunner, StepRunner


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy by default; `sample` draws from softmax(logits / temperature) restricted to top-p."""

    max_new_tokens: int = 32
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    eos_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # always produce max_new_tokens (speed measurements)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be >= 1", "pass e.g. --max-new-tokens 32")
        if self.temperature <= 0:
            raise UserError("--temperature must be > 0", "pass e.g. --temperature 0.7, or drop --sample for greedy")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]", "pass e.g. --top-p 0.9")


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    prefill_s: float
    decode_s: float
    stopped_at_eos: bool
    text: str = ""
    step_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole generate call (prefill included), as Optimum's figure is stated."""
        return len(self.new_ids) / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Cached steps only: tokens after the first over the decode time."""
        return max(len(self.new_ids) - 1, 0) / max(self.decode_s, 1e-9)

    def as_dict(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "new_tokens": len(self.new_ids), "new_ids": self.new_ids,
                "text": self.text, "prefill_ms": round(self.prefill_s * 1e3, 2), "decode_s": round(self.decode_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
                "stopped_at_eos": self.stopped_at_eos}


def choose(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Next token from one row of logits: argmax, or top-p sampling at `temperature`."""
    if not cfg.sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]  # smallest prefix with mass >= top_p
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])


def generate_ids(runner: StepRunner, prompt_ids: list[int], cfg: SamplingConfig) -> Generation:
    """Batch-1 generation: prefill (past length 0) then cached single-token steps."""
    cfg.check()
    if not prompt_ids:
        raise UserError("the prompt encodes to zero tokens", "pass a non-empty --prompt")
    rng = np.random.default_rng(cfg.seed)
    ids = np.asarray([prompt_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    feeds = step_inputs(ids, mask) | runner.spec.empty_past(1)
    t0 = time.perf_counter()
    out = runner.step(feeds)
    prefill = time.perf_counter() - t0
    new: list[int] = []
    steps: list[float] = []
    eos = set(cfg.eos_ids)
    stopped = False
    while True:
        tok = choose(out["logits"][0, -1], cfg, rng)
        new.append(tok)
        if tok in eos and not cfg.ignore_eos:
            stopped = True
            break
        if len(new) >= cfg.max_new_tokens:
            break
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        feeds = step_inputs(np.asarray([[tok]], np.int64), mask) | runner.spec.past_from_present(out)
        t1 = time.perf_counter()
        out = runner.step(feeds)
        steps.append(time.perf_counter() - t1)
    return Generation(list(prompt_ids), new, prefill, float(sum(steps)), stopped, step_s=steps)


@dataclass
class ServedFolder:
    """A built folder opened for generation: runner, tokenizer, stop tokens."""

    path: Path
    runner: StepRunner
    tokenizer: object
    eos_ids: tuple[int, ...]
    positions: int | None = None  # the model's position table (config.json), None where unknown

    def check_prompts(self, prompts: list[str] | tuple[str, ...], max_new_tokens: int) -> None:
        """Every prompt plus --max-new-tokens within the model's positions, before the first is generated."""
        for prompt in prompts:
            n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if self.positions is not None and n + max_new_tokens > self.positions:
                raise UserError(f"a prompt's {n} tokens plus --max-new-tokens {max_new_tokens} exceed the "
                                f"{self.positions} positions of the model in {self.path}",
                                f"shorten the prompt or pass --max-new-tokens <= {max(self.positions - n, 1)}")

    def generate(self, prompt: str, cfg: SamplingConfig) -> Generation:
        self.check_prompts([prompt], cfg.max_new_tokens)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        g = generate_ids(self.runner, list(ids), cfg)
        g.text = self.tokenizer.decode(g.new_ids, skip_special_tokens=True)
        return g


def _source_folder(path: Path) -> Path | None:
    """The model folder the build came from (report.json), for tokenizer/generation config."""
    rep = path / "report.json"
    if not rep.exists():
        return None
    try:
        src = json.loads(rep.read_text())["model"]["source"]
    except (ValueError, KeyError, TypeError):
        return None
    return Path(src) if src and Path(src).is_dir() else None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def eos_ids_of(folders: list[Path], tokenizer: object) -> tuple[int, ...]:
    """Stop tokens: generation_config.json's eos_token_id where a folder has one, else the tokenizer's."""
    for f in folders:
        gc = f / "generation_config.json"
        if gc.exists():
            eos = json.loads(gc.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    eos = getattr(tokenizer, "eos_token_id", None)
    return (int(eos),) if eos is not None else ()


def max_positions(folder: str | Path) -> int | None:
    """The position table of the model a build folder holds (its config.json), None where unknown."""
    import json

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    v = cfg.get("max_position_embeddings") or cfg.get("n_positions") if isinstance(cfg, dict) else None
    return v if isinstance(v, int) and v > 0 else None


def check_new_tokens(folder: str | Path, max_new_tokens: int) -> None:
    """--max-new-tokens against the model's positions (prompt tokens come on top)."""
    pos = max_positions(folder)
    if pos is not None and max_new_tokens >= pos:
        raise UserError(f"--max-new-tokens {max_new_tokens} reaches the {pos} positions of the model in {folder}",
                        f"pass --max-new-tokens < {pos} (the prompt's tokens count too)")


def open_folder(path: str | Path, model_file: str = "model.onnx", threads: int = 0) -> ServedFolder:
    """Open a `deploy build` folder (or any folder with a with-past model.onnx and a tokenizer)."""

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"build folder not found: {p}", "pass the --out folder of a `deploy build` of a causal LM")
    if Path(model_file).name != model_file or model_file in (".", ".."):
        raise UserError(f"--model-file {model_file!r} is not a file name inside {p}",
                        "pass the name of an ONNX file in the folder, e.g. --model-file model.int8.onnx")
    onnx_path = p / model_file
    if not onnx_path.is_file():
        raise UserError(f"{p} has no {model_file}", "pass the --out folder of a finished `deploy build`")
    runner = OrtStepRunner(onnx_path, threads=threads)
    src = _source_folder(p)
    tok_dir = p if _has_tokenizer(p) else src
    if tok_dir is None:
        raise UserError(f"{p} has no tokenizer files and its report.json names no model folder that has them",
                        "copy the model's tokenizer files into the folder")
    _quiet_transformers()
    tok = load_tokenizer(str(tok_dir))
    return ServedFolder(p, runner, tok, eos_ids_of([d for d in (p, src) if d is not None], tok), max_positions(p))
