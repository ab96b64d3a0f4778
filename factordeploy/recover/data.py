"""Recovery training data: `--recover-data generated|wiki|FILE`.

* `wiki`: windows of the packaged calibration split (models/text.py).
* FILE: the user's text (.txt, blank-line separated documents, or .jsonl with a "text" field),
  validated before any compression work (`check_recover_data`).
* `generated`: the teacher writes its own training text: sampled continuations (top-p 0.95,
  T = 1.0, seeded) of short, varied prompts - the first 3-8 words of calibration sentences and
  a few neutral openers - deduplicated, cached on disk (~/.cache/factordeploy/recovery), and
  mixed 1:1 with calibration windows. Sampling from the teacher covers what the teacher
  itself finds likely, not only one corpus, so the student is pulled toward the teacher's
  behaviour in general. Encoders cannot generate: the packaged decoder (SmolLM2) writes the
  text for them (measured in docs/recovery.md).

Nothing here ever reads news or pydoc (the out-of-domain evaluation texts).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models import text as textmod
from ..models.registry import LoadedModel, cache_dir, load_model
from ..progress import track

GENERATOR_FOR_ENCODERS = "smollm2"
OPENERS = ("The", "In", "It is", "One of the", "During the", "According to", "Many people", "A new",
           "After the", "There are", "When", "Scientists", "The city of", "Today,", "Although", "Her")
PROMPT_VERSION = 1


def check_recover_data(spec: str) -> None:
    """Reject a bad --recover-data before any work: a missing, empty, binary or non-UTF-8 file, or
    JSONL without text, named by the one text reader every input flag uses."""
    if spec not in ("generated", "wiki"):
        textmod.read_text_input(spec, "--recover-data")


def prompts(n: int, seed: int) -> list[str]:
    """Short, varied prompts: openers of calibration sentences, plus neutral openers."""
    rng = random.Random(seed)
    sents = textmod.sentences(textmod.calibration_articles())
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(OPENERS[rng.randrange(len(OPENERS))])
        else:
            words = sents[rng.randrange(len(sents))].split()
            out.append(" ".join(words[: rng.randint(3, 8)]))
    return out


def _dedup(texts: list[str]) -> list[str]:
    seen, out = set(), []
    for t in texts:
        key = " ".join(t.split()).lower()[:200]
        if key not in seen and len(t.split()) >= 8:
            seen.add(key)
            out.append(t)
    return out


@torch.no_grad()
def generate_texts(generator: LoadedModel, n: int, new_tokens: int, seed: int, batch: int = 16,
                   device: str = "cpu") -> list[str]:
    """`n` sampled continuations (deduplicated) from a causal LM, cached on disk by (model, n, length, seed)."""
    key = hashlib.sha256(json.dumps([generator.name, generator.source, n, new_tokens, seed, PROMPT_VERSION]).encode()).hexdigest()[:16]
    path = cache_dir() / "recovery" / f"generated-{generator.name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())["texts"]
    tok, model = generator.tokenizer, generator.model
    side = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(seed)
    texts: list[str] = []
    ps = prompts(n, seed)
    try:
        model.eval()
        for i in track(range(0, n, batch), f"recovery data: {generator.name} writes {n} texts", total=-(-n // batch)):
            enc = tok(ps[i:i + batch], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id)
            texts.extend(tok.batch_decode(out, skip_special_tokens=True))
    finally:
        tok.padding_side = side
    texts = _dedup([t.strip() for t in texts])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"generator": generator.name, "seed": seed, "new_tokens": new_tokens, "texts": texts}))
    os.replace(tmp, path)
    return texts


@dataclass
class RecoveryData:
    windows: list[list[int]]
    source: str
    generated_texts: int = 0


def recovery_windows(loaded: LoadedModel, spec: str, n: int, length: int, seed: int,
                     device: str = "cpu") -> RecoveryData:
    """`n` training windows of `length` tokens for the model in `loaded` (still the ORIGINAL model)."""
    if spec == "wiki":
        stream = loaded.token_ids(textmod.calibration_articles())
        return RecoveryData(textmod.sample_windows(stream, n, length, seed), "wiki calibration split")
    if spec != "generated":
        stream = loaded.token_ids(textmod.read_text_input(spec, "--recover-data"))
        if len(stream) < length:
            raise UserError(f"--recover-data {spec} has {len(stream)} tokens, fewer than one training window "
                            f"(--calib-len {length})", "add text to the file, or use a smaller --calib-len")
        return RecoveryData(textmod.sample_windows(stream, n, length, seed), f"file {spec}")
    gen = loaded if loaded.kind == "decoder" else load_model(GENERATOR_FOR_ENCODERS)
    # Each generated text gives about one window; ask for a few more than half the windows.
    texts = generate_texts(gen, max(8, (n // 2) * 5 // 4), length, seed, device=device if gen is loaded else "cpu")
    g_stream = loaded.token_ids(texts)
    n_gen = min(n // 2, max(0, len(g_stream) // length))
    c_stream = loaded.token_ids(textmod.calibration_articles())
    windows = textmod.sample_windows(g_stream, n_gen, length, seed) if n_gen else []
    windows += textmod.sample_windows(c_stream, n - n_gen, length, seed + 1)
    random.Random(seed).shuffle(windows)
    return RecoveryData(windows, f"generated by {gen.name} ({len(texts)} deduplicated texts, {n_gen} windows) "
                                 f"+ wiki calibration split ({n - n_gen} windows)", len(texts))


def selection_windows(loaded: LoadedModel, n: int, length: int, seed: int) -> list[list[int]]:
    """Held-out windows for keep-best evaluation (models/text.selection_texts: never trained on, never reported)."""
    return textmod.sample_windows(loaded.token_ids(textmod.selection_texts()), n, length, seed + 7)
