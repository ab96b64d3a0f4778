"""Which TensorRT is here, what it can do on this machine, and polygraphy wired to it.

Two Python modules expose the same builder API:
- `tensorrt` (full TensorRT, datacenter GPUs; Quickly Deployable Plugins in `tensorrt.plugin`);
- `tensorrt_rtx_bindings` (TensorRT-RTX; builds ahead-of-time with no GPU, runs on compute
  capability 8.0/8.6/8.9/12.x only - not on 9.0, e.g. an H100).
A bare `import tensorrt` proves nothing (the `tensorrt-stubs` package installs an empty one), so a
module counts only if it has a `Builder`. Everything TensorRT in this package goes through
`resolve()`; tests simulate a machine without TensorRT by monkeypatching `_import_candidate`.

Polygraphy supports TensorRT-RTX when `POLYGRAPHY_USE_TENSORRT_RTX=1`, but then imports the module
name `tensorrt_rtx`, which the RTX bindings wheel does not provide. `polygraphy_trt()` registers
the bindings under that name in `sys.modules` (an import shim; nothing in site-packages is edited)
and flips polygraphy's config before `polygraphy.backend.trt` is first imported.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..errors import UserError
from .trt_setup import ensure_rtx_symlink

FULL = "trt"
RTX = "trt-rtx"
BACKENDS = ("auto", FULL, RTX, "ort")

INSTALL = {
    FULL: "pip install tensorrt-cu13 (libraries come from NVIDIA's package index; datacenter GPU machine), "
          "or use --backend trt-rtx",
    RTX: "pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116 "
         "&& python -m factordeploy.engines.trt_setup",
}
_MODULES = {FULL: "tensorrt", RTX: "tensorrt_rtx_bindings"}
# Seen in TensorRT-RTX 1.7's own refusal on an H100: "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1 >12.0".
RTX_COMPUTE = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
FULL_MIN_COMPUTE = (7, 5)  # TensorRT 10.x: Turing and newer


@dataclass
class TrtInfo:
    """A usable TensorRT flavour and what it can do on this machine."""

    flavor: str  # "trt" | "trt-rtx"
    module: ModuleType
    version: str
    can_build: bool
    can_run: bool
    why_not_run: str = ""
    gpu: str = ""
    compute: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ("TensorRT" if self.flavor == FULL else "TensorRT-RTX") + f" {self.version}"

    @property
    def has_qdp(self) -> bool:
        """Quickly Deployable Plugins (`tensorrt.plugin`) exist only in full TensorRT."""
        if self.flavor != FULL:
            return False
        try:
            importlib.import_module(self.module.__name__ + ".plugin")
            return True
        except Exception:
            return False


def _import_candidate(name: str) -> ModuleType | None:
    """Import `name` if it is a real TensorRT (has a Builder); None otherwise."""
    if name == "tensorrt_rtx_bindings":
        try:
            ensure_rtx_symlink()  # cheap, idempotent; see trt_setup for why it matters
        except Exception:
            pass
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    return mod if hasattr(mod, "Builder") else None


def gpu_compute() -> tuple[str, tuple[int, int] | None]:
    """(GPU name, compute capability) of GPU 0, or ("", None) when there is none."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.strip().splitlines()
            if out:
                name, cap = (x.strip() for x in out[0].rsplit(",", 1))
                major, minor = cap.split(".")
                return name, (int(major), int(minor))
        except Exception:
            pass
    return "", None


def _runnable(flavor: str, gpu: str, cc: tuple[int, int] | None) -> tuple[bool, str]:
    if cc is None:
        return False, "no CUDA GPU on this machine: the engine was built ahead-of-time but cannot be executed here"
    if flavor == RTX and not (cc in RTX_COMPUTE or cc > (12, 1)):
        return False, (f"TensorRT-RTX engines do not run on {gpu} (compute capability {cc[0]}.{cc[1]}); supported: "
                       + " ".join(f"{a}.{b}" for a, b in RTX_COMPUTE) + " and newer than 12.1")
    if flavor == FULL and cc < FULL_MIN_COMPUTE:
        return False, f"TensorRT 10+ needs compute capability >= 7.5, {gpu} has {cc[0]}.{cc[1]}"
    return True, ""


def resolve(flavor: str = "any") -> TrtInfo | None:
    """The TensorRT to use: `flavor` "trt", "trt-rtx", or "any" (full TensorRT first, then RTX)."""
    order = [FULL, RTX] if flavor == "any" else [flavor]
    for f in order:
        mod = _import_candidate(_MODULES[f])
        if mod is None:
            continue
        gpu, cc = gpu_compute()
        ok, why = _runnable(f, gpu, cc)
        return TrtInfo(flavor=f, module=mod, version=str(getattr(mod, "__version__", "?")), can_build=True,
                       can_run=ok, why_not_run=why, gpu=gpu, compute=cc)
    return None


def require(flavor: str) -> TrtInfo:
    """resolve(flavor) or a one-line UserError naming the install command."""
    info = resolve(flavor)
    if info is None:
        what = "full TensorRT (Python module `tensorrt` with a Builder)" if flavor == FULL else \
            "TensorRT-RTX (Python module `tensorrt_rtx_bindings`)"
        raise UserError(f"--backend {flavor} needs {what}, which is not installed", INSTALL[flavor])
    return info


@dataclass
class BackendChoice:
    backend: str  # "trt" | "trt-rtx" | "ort"
    reason: str
    info: TrtInfo | None = None


def choose_backend(requested: str) -> BackendChoice:
    """`--backend` -> the backend to build, and why. `auto` needs a TensorRT that can also *run* here."""
    if requested not in BACKENDS:
        raise UserError(f"unknown --backend '{requested}'", "use one of " + ", ".join(BACKENDS))
    if requested == "ort":
        return BackendChoice("ort", "ONNX Runtime requested (--backend ort)")
    if requested in (FULL, RTX):
        info = require(requested)
        run = "and runs on this GPU" if info.can_run else f"but cannot run here ({info.why_not_run})"
        return BackendChoice(requested, f"--backend {requested} requested; {info.label} builds here {run}", info)
    seen = []
    for f in (FULL, RTX):
        info = resolve(f)
        if info is None:
            seen.append(f"{f}: not installed")
        elif info.can_run:
            return BackendChoice(f, f"auto: {info.label} is installed and supports {info.gpu}", info)
        else:
            seen.append(f"{f}: {info.label} installed but {info.why_not_run}")
    return BackendChoice("ort", "auto: no TensorRT that can run here (" + "; ".join(seen)
                         + "); ONNX Runtime chosen. Pass --backend trt-rtx to build an engine anyway")


def polygraphy_trt(info: TrtInfo) -> ModuleType:
    """`polygraphy.backend.trt`, importing `info.module` under the name polygraphy expects."""
    rtx = info.flavor == RTX
    if rtx:
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
        sys.modules.setdefault("tensorrt_rtx", info.module)
    else:
        sys.modules.setdefault("tensorrt", info.module)
    from polygraphy import config as pconfig

    if "polygraphy.backend.trt" in sys.modules and bool(pconfig.USE_TENSORRT_RTX) != rtx:
        raise RuntimeError("polygraphy.backend.trt was already imported for the other TensorRT flavour")
    pconfig.USE_TENSORRT_RTX = rtx
    return importlib.import_module("polygraphy.backend.trt")


def describe(info: TrtInfo | None) -> dict[str, Any]:
    if info is None:
        return {"installed": False}
    return {"installed": True, "flavor": info.flavor, "version": info.version, "can_build": info.can_build,
            "can_run": info.can_run, "why_not_run": info.why_not_run, "gpu": info.gpu,
            "compute_capability": ".".join(map(str, info.compute)) if info.compute else None,
            "quickly_deployable_plugins": info.has_qdp}
