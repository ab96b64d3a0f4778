"""One-time TensorRT-RTX set-up: `python -m factordeploy.engines.trt_setup` (scripts/setup.sh runs it).

Why: the `tensorrt-rtx-cu13-libs` wheel ships only the versioned `libtensorrt_rtx.so.1`, but the
RTX ONNX parser dlopens the *unversioned* `libtensorrt_rtx.so` the first time it meets a node that
must become a plugin layer. When that dlopen fails the parser calls std::terminate
("terminate called without an active exception") and the whole Python process dies - not an
exception anyone can catch. The parser searches its own folder first, so a symlink
`libtensorrt_rtx.so -> libtensorrt_rtx.so.1` inside the installed `tensorrt_rtx_libs` package
folder fixes it. Idempotent; does nothing when the package is absent or the link exists.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

LINK_NAME = "libtensorrt_rtx.so"
TARGET_NAME = "libtensorrt_rtx.so.1"


def rtx_libs_dir() -> Path | None:
    """Folder of the installed `tensorrt_rtx_libs` package (found without importing it)."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ensure_rtx_symlink() -> tuple[bool, str]:
    """Make the unversioned symlink if missing. Returns (ok, what happened)."""
    folder = rtx_libs_dir()
    if folder is None:
        return False, "tensorrt_rtx_libs is not installed (pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)"
    target = folder / TARGET_NAME
    link = folder / LINK_NAME
    if not target.exists():
        return False, f"{target} not found (unexpected tensorrt_rtx_libs layout)"
    if link.exists():
        return True, f"{link} already present"
    if link.is_symlink():  # dangling link from an older install
        link.unlink()
    try:
        os.symlink(TARGET_NAME, link)  # relative, so the venv stays relocatable
    except OSError as e:
        return False, f"cannot create {link}: {e}"
    return True, f"created {link} -> {TARGET_NAME}"


def rtx_symlink_present() -> bool:
    folder = rtx_libs_dir()
    return folder is not None and (folder / LINK_NAME).exists()


def main() -> int:
    ok, msg = ensure_rtx_symlink()
    print(f"trt_setup: {msg}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
