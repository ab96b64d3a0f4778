"""Every way a model folder can be broken, as a named UserError before or while it loads.

The order is cheapest first: the folder and config.json, the architecture, the weight files'
headers (no tensor data read), the tokenizer, then the weights themselves (pickle refusals,
shape mismatches, tensors transformers would silently fill with random values) and finally
NaN/Inf in any weight.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from ..errors import UserError

Kind = Literal["encoder", "decoder"]
SUPPORTED = ("text encoders (tested: bert; e.g. roberta, distilbert) and causal LMs "
             "(tested: llama, gpt2; e.g. mistral, qwen2)")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
RESAVE = "re-save the model with save_pretrained(DIR) from a trusted copy"
# Missing from many checkpoints and never part of the exported output (last_hidden_state / logits).
IGNORED_MISSING = ("pooler",)


def read_config(folder: Path) -> dict:
    """config.json of a model folder, as a dict (named errors for a missing or broken file)."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UserError(f"'{folder}' is not a Hugging Face model folder (no config.json)",
                        "pass a folder with config.json and weights, or a name from `deploy models`")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg} is not valid JSON ({e})", "restore config.json from the model's original files") from None
    if not isinstance(data, dict):
        raise UserError(f"{cfg} is not a JSON object", "restore config.json from the model's original files")
    return data


def check_architecture_name(folder: Path, data: dict) -> None:
    """model_type known to the installed transformers, and no remote code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    mt = data.get("model_type")
    if not mt:
        raise UserError(f"{folder / 'config.json'} names no model_type", "restore config.json from the model's original files")
    if mt not in CONFIG_MAPPING_NAMES:
        raise UserError(f"unsupported architecture '{mt}' in {folder} (unknown to transformers; custom code is never run)",
                        f"use one of the supported kinds: {SUPPORTED}")


def model_class(config, decoder: bool, folder: str) -> type:
    """The transformers class to load, refusing what the pipeline cannot export or evaluate."""
    from transformers import AutoModel, AutoModelForCausalLM

    mt = getattr(config, "model_type", "?")
    unsupported = None
    if getattr(config, "is_encoder_decoder", False):
        unsupported = "encoder-decoder"
    elif not isinstance(getattr(config, "vocab_size", None), int):
        unsupported = "not a text model (no vocab_size)"
    auto = AutoModelForCausalLM if decoder else AutoModel
    cls = auto._model_mapping.get(type(config), None) if unsupported is None else None
    if unsupported is None and cls is None:
        unsupported = "no causal-LM class" if decoder else "no base model class"
    if unsupported is None and getattr(cls, "main_input_name", "input_ids") != "input_ids":
        unsupported = f"reads {cls.main_input_name}, not text"
    if unsupported:
        raise UserError(f"unsupported architecture '{mt}' in {folder} ({unsupported})",
                        f"use one of the supported kinds: {SUPPORTED}")
    return cls


def _safetensors_problem(f: Path) -> str | None:
    """Why a .safetensors file cannot be complete (header only; no tensor data read)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"truncated: its header claims {n:,} bytes but the file has {size:,}"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "corrupt: its header is not valid JSON"
    if not isinstance(header, dict):
        return "corrupt: its header is not a JSON object"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated: its tensors need {need:,} bytes but the file has {size:,}"
    return None


def check_weight_files(folder: Path) -> None:
    """Weights present, and every safetensors file (or shard) complete."""
    present = [w for w in WEIGHT_FILES if (folder / w).is_file()]
    if not present:
        raise UserError(f"'{folder}' has config.json but no weights (looked for {', '.join(WEIGHT_FILES)})",
                        "copy the weights file into the folder, or save the model with save_pretrained(DIR)")
    files: list[Path] = []
    for name in present:
        if name.endswith(".index.json"):
            idx = folder / name
            try:
                shards = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{idx} is not a valid shard index (no weight_map)", RESAVE) from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(f"{idx} lists {len(missing)} shard(s) that are not in the folder (e.g. {missing[0]})",
                                "copy every shard file into the folder")
            files += [folder / s for s in shards]
        else:
            files.append(folder / name)
    for f in files:
        if f.suffix == ".safetensors":
            problem = _safetensors_problem(f)
            if problem:
                raise UserError(f"weights file {f} is {problem}", "copy the complete file again (the download or copy was cut short)")
        elif f.stat().st_size == 0:
            raise UserError(f"weights file {f} is empty", "copy the complete file again")


def load_tokenizer(path: str, config=None, **kw) -> object:
    """The folder's tokenizer, refused when it does not load, cannot encode ordinary text, or (given the
    model's config) has more tokens than the embedding has rows."""
    from transformers import AutoTokenizer

    fix = "save the model's tokenizer into the folder (tokenizer.save_pretrained(DIR))"
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:  # transformers raises many types here (OSError, ValueError, JSONDecodeError, ...)
        raise UserError(f"the tokenizer in {path} does not load ({type(e).__name__}: {first_line(e)})", fix) from None
    if not callable(tok):
        raise UserError(f"the tokenizer in {path} does not load (got {type(tok).__name__})", fix)
    sample = "The city council met on Tuesday to discuss the new bridge over the river."
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    if not ids or (unk is not None and sum(i == unk for i in ids) > len(ids) // 2):
        raise UserError(f"the tokenizer in {path} maps ordinary text to unknown tokens (vocabulary of {len(tok)} entries): "
                        "its vocabulary files are missing or broken", fix)
    rows = getattr(config, "vocab_size", None) if config is not None else None
    if isinstance(rows, int) and len(tok) > rows:
        raise UserError(f"the tokenizer in {path} has {len(tok):,} tokens but the model's embedding has {rows:,} rows",
                        "use the tokenizer the model was trained with")
    return tok


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


def _pickle_reason(e: BaseException) -> str:
    m = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: [^\s]+|Unsupported operand [^\s]+)", str(e))
    return m.group(1) if m else first_line(e)


@contextmanager
def named_load_errors(path: str) -> Iterator[None]:
    """Map whatever transformers/torch/safetensors raise while loading weights to one named problem."""
    import pickle

    try:
        yield
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        raise UserError(f"pickle checkpoint in {path} refused by the safe loader (torch.load weights_only=True): "
                        f"{_pickle_reason(e)}; loading it unsafely could run code",
                        "convert it to safetensors where you trust the file "
                        "(AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR)), or ask its author for model.safetensors") from None
    except MemoryError:
        raise UserError(f"not enough memory to load the model in {path}", "use a machine with more RAM, or a smaller model") from None
    except Exception as e:
        text = str(e)
        if "ignore_mismatched_sizes" in text or "size mismatch" in text:
            raise UserError(f"tensor shapes in the weights of {path} do not match its config.json",
                            "use the config.json the weights were saved with") from None
        pickled = not any((Path(path) / w).is_file() for w in WEIGHT_FILES[:2])
        what, fix = (("pickle checkpoint", "copy the complete file again, or convert it to safetensors where it loads")
                     if pickled else ("weights", RESAVE))
        raise UserError(f"the {what} in {path} does not load ({type(e).__name__}: {first_line(e)})", fix) from None


def check_loading_info(info: dict, path: str) -> None:
    """Refuse tensors transformers would fill with random values (missing) or reshape (mismatched)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(s in k for s in IGNORED_MISSING))
    if missing:
        raise UserError(f"the weights in {path} lack {len(missing)} tensor(s) the model needs (e.g. {missing[0]}); "
                        "they would be filled with random values",
                        "the checkpoint is incomplete or from another architecture: " + RESAVE)
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if mismatched:
        raise UserError(f"tensor shapes in the weights of {path} do not match config.json (e.g. {mismatched[0]})",
                        "use the config.json the weights were saved with")


def check_finite(model: nn.Module, path: str) -> None:
    """Every floating-point weight finite; names the first bad tensor (one pass, tensor by tensor)."""
    bad = []
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad.append((name, int(torch.isnan(p).sum()), int(torch.isinf(p).sum())))
    if bad:
        name, nans, infs = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UserError(f"weight {name} in {path} holds {nans} NaN and {infs} Inf values{more}",
                        "the checkpoint is corrupt or from a diverged run: export it again from a good training state")
