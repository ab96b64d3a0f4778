"""Safe, atomic training checkpoints: `torch.save` of tensors and plain Python values only,
read back with `torch.load(weights_only=True)` (no pickled code is ever executed)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..outdir import check_writable_folder

STATE_FILE = "trainer.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (torch CPU/CUDA, Python, NumPy), as safe-to-load values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate()),
          "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_py_state_from_list(st["python"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _py_state_to_list(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_list(s: list) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def save_state(state: dict[str, Any], folder: str | Path) -> Path:
    """Write folder/trainer.pt atomically (a kill mid-write leaves the previous checkpoint intact)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(folder: str | Path, signature: dict[str, Any], map_location: str = "cpu") -> dict[str, Any] | None:
    """The checkpoint in `folder`, or None; one written for a different run is refused."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's folder, not a bug
        raise UserError(f"training checkpoint {path} cannot be read ({type(e).__name__})",
                        "delete that folder or pass another checkpoint folder") from e
    if state.get("signature") != signature:
        raise UserError(f"training checkpoint {path} was written for a different run (model, data or settings differ)",
                        "delete that folder or pass another checkpoint folder")
    return state


def check_state_folder(folder: str | Path, flag: str) -> None:
    """Before any work: `flag`'s folder is a folder, and a checkpoint in it loads through the safe
    loader (tensors, numbers, lists, dicts only; a crafted pickle is refused, never run)."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder", f"pass a folder ({STATE_FILE} is written inside it)")
    check_writable_folder(p, flag)
    path = p / STATE_FILE
    if not path.is_file():
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for a refused object, RuntimeError for a damaged file
        text = str(e)
        reason = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "") or \
            f"{type(e).__name__}: {text.strip().splitlines()[0][:150] if text.strip() else 'unreadable'}"
        raise UserError(f"{flag} checkpoint {path} is not a loadable checkpoint ({reason})",
                        "delete it (training restarts from step 0) or pass another folder") from None
