"""Reference SparseGPT 2:4 with llm-compressor (vllm-project/llm-compressor), run in the PEER venv.

    /work/peer-venv/bin/python benchmarks/peer/sparsegpt_llmcompressor.py --model-dir DIR \
        --windows calib.npy --out peer.safetensors [--pipeline sequential|basic]

Loads a plain HF folder, prunes the 7 per-block projections of every decoder layer with
`SparseGPTModifier(sparsity=0.5, mask_structure="2:4")` through `oneshot` on the given token-id
windows (an in-memory `datasets.Dataset`; nothing is downloaded), and saves the pruned state dict
(safetensors; a tied lm_head is stored once, as the embedding) plus `<out>.json` with the settings.
Runs with this project's code absent: it imports nothing from factordeploy.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

TARGETS = [r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"]


def calibration_dataset(path: Path):
    """The project's calibration windows (int token ids, n x L) as an in-memory Dataset."""
    from datasets import Dataset

    ids = np.load(path)
    if ids.ndim != 2:
        raise SystemExit(f"{path}: expected an (n, length) array of token ids, got shape {ids.shape}")
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})


def prune(model_dir: str, windows: Path, pipeline: str, block_size: int, damp: float, batch: int) -> tuple:
    """oneshot SparseGPT 2:4 on the folder's model; returns (model, seconds, number of windows, length)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = calibration_dataset(windows)
    n, length = len(ds), len(ds[0]["input_ids"])
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", block_size=block_size, dampening_frac=damp,
                               targets=TARGETS, ignore=["re:.*lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n,
            max_seq_length=length, shuffle_calibration_samples=False, batch_size=batch, pipeline=pipeline,
            log_dir=None, output_dir=None)
    return model, time.perf_counter() - t0, n, length


def state_dict_once(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """State dict with a tied lm_head dropped (safetensors refuses shared storage); (tensors, tied)."""
    sd = model.state_dict()
    tied = "lm_head.weight" in sd and sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    if tied:
        sd.pop("lm_head.weight")
    return {k: v.detach().contiguous() for k, v in sd.items()}, tied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--windows", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--pipeline", default="sequential", choices=("sequential", "basic"))
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    from safetensors.torch import save_file

    model, dt, n, length = prune(a.model_dir, a.windows, a.pipeline, a.block_size, a.damp, a.batch)
    sd, tied = state_dict_once(model)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + f".tmp{os.getpid()}")
    save_file(sd, str(tmp))
    meta = {"llmcompressor": md.version("llmcompressor"), "compressed-tensors": md.version("compressed-tensors"),
            "transformers": md.version("transformers"), "torch": torch.__version__, "pipeline": a.pipeline,
            "sparsity": 0.5, "mask_structure": "2:4", "block_size": a.block_size, "dampening_frac": a.damp,
            "targets": TARGETS, "ignore": ["re:.*lm_head"], "calib_windows": n, "calib_len": length,
            "batch": a.batch, "prune_s": round(dt, 1), "tied_lm_head": tied, "threads": torch.get_num_threads()}
    a.out.with_name(a.out.name + ".json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, a.out)  # the weights file appears last: its presence means the run finished
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
