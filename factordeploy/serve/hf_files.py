"""config.json, tokenizer files and generation_config.json in a build folder, readable by other stacks.

A folder that holds model.onnx plus these files is what `optimum.onnxruntime.ORTModel*.from_pretrained`
loads. Other stacks pin older transformers (Optimum: 4.57), so two things written by transformers 5 are
made portable (shared/SERVING.md has the measurements behind both):
- RoPE lives only in `rope_parameters` in v5; 4.57 ignores that key and silently falls back to
  rope_theta = 10000. The flat `rope_theta` / `rope_scaling` keys are written beside it.
- `tokenizer_class: "TokenizersBackend"` is v5-only; `PreTrainedTokenizerFast` (both read it from
  tokenizer.json) is written instead, with `model_input_names` stated so it returns what the graph takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.registry import LoadedModel

# tokenizer classes transformers 4.57 cannot resolve; PreTrainedTokenizerFast loads tokenizer.json in both
_V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def portable_config(d: dict[str, Any]) -> dict[str, Any]:
    """A transformers-5 config dict plus the flat keys older readers use (the v5 keys stay)."""
    out = dict(d)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        # 4.57: rope_scaling None means the default rotary embedding; anything else carries its type
        out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    return out


def portable_tokenizer_config(d: dict[str, Any], model_input_names: list[str]) -> dict[str, Any]:
    out = dict(d)
    if out.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES or not out.get("tokenizer_class"):
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    out["model_input_names"] = list(model_input_names)
    for k in ("is_local", "local_files_only", "backend"):  # load-time state of this machine, not the tokenizer
        out.pop(k, None)
    return out


def write_hf_files(loaded: LoadedModel, folder: Path) -> dict[str, Any]:
    """Write the files into `folder`; returns what was written (for the report)."""
    folder = Path(folder)
    model = loaded.model
    cfg = portable_config(model.config.to_dict())
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")

    tok_files = [Path(p).name for p in loaded.tokenizer.save_pretrained(str(folder))]
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    tc = portable_tokenizer_config(tc, loaded.input_names)
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True, default=str) + "\n")

    written = ["config.json", *sorted(set(tok_files) | {"tokenizer_config.json"})]
    gen = getattr(model, "generation_config", None)
    if loaded.kind == "decoder" and gen is not None:
        gen.save_pretrained(str(folder))
        written.append("generation_config.json")
    return {
        "files": written,
        "model_type": cfg.get("model_type"),
        "tokenizer_class": tc["tokenizer_class"],
        "flat_keys_added": sorted(k for k in ("rope_theta", "rope_scaling", "torch_dtype")
                                  if k in cfg and k not in model.config.to_dict()),
    }
