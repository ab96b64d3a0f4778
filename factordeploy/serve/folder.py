"""Open an existing build folder safely: report.json + model.onnx, with one-line errors for anything else.

An ONNX file can name external-data files by relative path; a folder received from elsewhere
could point them outside itself (`../../secret`), and ONNX Runtime would read them. Every
external-data location must resolve inside the folder, or the folder is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import UserError


@dataclass
class BuildFolder:
    path: Path
    report: dict

    @property
    def model(self) -> Path:
        return self.path / "model.onnx"

    def file(self, key: str) -> Path | None:
        """An artifact named in the report (by key), if it is on disk."""
        v = self.report.get("artifacts", {}).get(key)
        p = self.path / Path(v).name if v else None
        return p if p is not None and p.is_file() else None


def external_data_locations(onnx_path: Path) -> list[str]:
    m = onnx.load(str(onnx_path), load_external_data=False)
    locs = set()
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            locs.update(e.value for e in t.external_data if e.key == "location")
    return sorted(locs)


def check_external_data(onnx_path: Path, folder: Path) -> list[str]:
    """The external-data files of `onnx_path`; UserError if one resolves outside `folder` or is missing."""
    root = folder.resolve()
    try:
        locs = external_data_locations(onnx_path)
    except Exception as e:  # a truncated or non-ONNX file
        raise UserError(f"{onnx_path} is not a readable ONNX model ({type(e).__name__})",
                        "rebuild the folder with `deploy build`") from e
    for loc in locs:
        target = (onnx_path.parent / loc).resolve()
        if not target.is_relative_to(root):
            raise UserError(f"{onnx_path.name} names external data '{loc}' outside the folder {folder}",
                            "refusing to read it; use a folder whose external data lies inside it")
        if not target.is_file():
            raise UserError(f"{onnx_path.name} names external data '{loc}' that is missing",
                            "copy the whole build folder, including its .data files")
    return locs


def open_build_folder(path: str | Path) -> BuildFolder:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"build folder not found: {p}", "pass a folder written by `deploy build`")
    rep = p / "report.json"
    if not rep.is_file() or not (p / "model.onnx").is_file():
        raise UserError(f"{p} is not a build folder (needs report.json and model.onnx)",
                        "pass a folder written by `deploy build`")
    try:
        report = json.loads(rep.read_text())
        report["model"]["kind"], report["method"]["name"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{rep} is not a factordeploy report ({type(e).__name__})",
                        "rebuild the folder with `deploy build`") from e
    check_external_data(p / "model.onnx", p)
    return BuildFolder(p, report)
