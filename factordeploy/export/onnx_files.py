"""Reading an ONNX file the package did not just write: external data must stay inside its folder.

An ONNX model may keep tensors in side files named by a relative `location`. A crafted model
can name `../../etc/shadow`, an absolute path, or a symbolic link that leaves the folder;
onnx, ONNX Runtime and TensorRT each refuse some of these with a traceback of their own. Every
ONNX path the package reads goes through `check_external_data` first (one named error).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model

from ..errors import UserError


def _problem(folder: Path, location: str) -> str | None:
    if not location:
        return "an empty location"
    if os.path.isabs(location) or Path(location).drive:
        return f"the absolute path {location}"
    target = folder / location
    if not target.resolve().is_relative_to(folder.resolve()):
        return f"{location}, outside the folder" + (" through a symbolic link" if ".." not in Path(location).parts else "")
    if not target.is_file():
        return f"{location}, which does not exist"
    return None


def check_external_data(proto: onnx.ModelProto, path: str | Path) -> None:
    """Refuse external-data locations that are absolute, escape `path`'s folder, or are missing."""
    folder = Path(path).parent
    for t in _get_all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        problem = _problem(folder, location)
        if problem:
            raise UserError(f"{path} keeps tensor '{t.name}' in {problem}",
                            "use an ONNX model whose external data files sit in its own folder "
                            "(onnx.save_model(..., save_as_external_data=True, location='NAME.data'))")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """onnx.load with the external-data check in between (the graph is parsed once)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError for a non-ONNX file, OSError for a missing one
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__})", "pass a .onnx file") from None
    check_external_data(proto, path)
    load_external_data_for_model(proto, str(Path(path).parent))
    return proto


def check_onnx_file(path: str | Path) -> None:
    """For readers that take a path (ONNX Runtime, TensorRT's parser): check without loading the data."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__})", "pass a .onnx file") from None
    check_external_data(proto, path)
