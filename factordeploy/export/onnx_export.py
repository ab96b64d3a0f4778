"""torch -> ONNX with Hugging Face input names, dynamic batch/sequence axes, and checks.

Uses the dynamo exporter (torch.export), which also carries custom-domain nodes emitted
by factorized layers through `torch.onnx.ops.symbolic`. Every export is validated with
onnx.checker and shape inference before anything downstream sees it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import UserError
from ..models.registry import LoadedModel, cache_dir
from ..outdir import atomic_path
from . import kv_cache

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf caps a single file at 2 GB


class ExportWrapper(nn.Module):
    """Positional inputs in ONNX order -> the single exported output."""

    def __init__(self, loaded: LoadedModel, model: nn.Module) -> None:
        super().__init__()
        self.loaded = loaded
        self.inner = model
        self.names = list(loaded.input_names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.loaded.output(self.inner, {n: feeds[n] for n in self.names})


@dataclass
class ExportResult:
    path: str
    opset: int
    seconds: float
    checker: str
    shape_inference: str
    nodes: int
    initializers: int
    inputs: list[str]
    outputs: list[str]


def export_onnx(loaded: LoadedModel, model: nn.Module, path: str | Path, opset: int = OPSET,
                batch: int = 2, seq: int = 16, optimize: bool = False, with_past: bool = True) -> ExportResult:
    """Export `model` (the loaded model or a compressed copy) to `path` and validate it.

    Encoders: `input_ids, attention_mask[, token_type_ids] -> last_hidden_state`. Decoders get
    the KV-cache signature of Optimum's with-past export (export/kv_cache.py), so the same
    model.onnx serves prefill and decode steps; `with_past=False` exports a decoder's full-sequence
    forward only (`input_ids, attention_mask -> logits`), for attention whose state is not a KV cache.

    The exporter's own onnxscript optimizer is off by default: on a 30-layer decoder it
    costs as much as the translation itself, and our pass pipeline (passes/) folds
    constants anyway, with the guarantee that factorized layers are never refolded.
    """
    path = Path(path)
    device = next(model.parameters()).device  # export where the model lives (cuda for big models)
    inputs = loaded.example_inputs(batch, seq)
    max_pos = int(getattr(getattr(model, "config", None), "max_position_embeddings", 8192) or 8192)
    if loaded.kind == "decoder" and with_past:
        spec = kv_cache.CacheSpec.from_config(model.config)
        wrapper: nn.Module = kv_cache.WithPast(model, spec).eval()
        args = tuple(a.to(device) for a in kv_cache.example_args(spec, inputs["input_ids"]))
        in_names, out_names = spec.input_names, spec.output_names
        dyn: object = kv_cache.dynamic_shapes(spec, max_pos)
    else:
        wrapper = ExportWrapper(loaded, model).eval()
        args = tuple(inputs[n].to(device) for n in loaded.input_names)
        in_names, out_names = list(loaded.input_names), [loaded.output_name]
        b = torch.export.Dim("batch", min=1, max=4096)
        s = torch.export.Dim("sequence", min=1, max=max_pos)
        dyn = {n: {0: b, 1: s} for n in loaded.input_names}
    t0 = time.perf_counter()
    buf_out, buf_err = io.StringIO(), io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=in_names, output_names=out_names,
                                     dynamic_shapes=dyn, opset_version=opset, optimize=optimize, verbose=False)
    except Exception as e:
        tail = (buf_err.getvalue() or buf_out.getvalue()).strip().splitlines()[-3:]
        raise UserError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} {' | '.join(tail)}",
                        "report this model/method combination; try --method svd to isolate the layer type") from e
    proto = prog.model_proto
    if loaded.kind == "decoder":
        kv_cache.name_total_axis(proto)
    size = proto.ByteSize()
    path.parent.mkdir(parents=True, exist_ok=True)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))
    seconds = time.perf_counter() - t0
    checker, shapes = validate_onnx(path)
    return ExportResult(str(path), opset, round(seconds, 3), checker, shapes, len(proto.graph.node),
                        len(proto.graph.initializer), in_names, out_names)


def validate_onnx(path: str | Path) -> tuple[str, str]:
    """onnx.checker (full check) and strict shape inference; raises UserError on failure."""
    path = str(path)
    try:
        onnx.checker.check_model(path, full_check=False)
    except onnx.checker.ValidationError as e:
        raise UserError(f"exported ONNX fails onnx.checker: {str(e).splitlines()[0]}", "report this as a bug") from e
    try:
        tmp = path + ".inferred"
        onnx.shape_inference.infer_shapes_path(path, tmp, check_type=True, strict_mode=True)
        os.remove(tmp)
    except Exception as e:
        raise UserError(f"exported ONNX fails shape inference: {str(e).splitlines()[0]}", "report this as a bug") from e
    return "passed", "passed"


def _source_key(loaded: LoadedModel, opset: int) -> str:
    """Identity of an unmodified model's export: its files (name, size, mtime), torch and opset."""
    import hashlib

    h = hashlib.sha256(f"{loaded.name}|{torch.__version__}|{onnx.__version__}|{opset}|noopt|{loaded.kind}-kv1".encode())
    src = Path(loaded.source)
    for f in sorted(src.rglob("*")) if src.is_dir() else []:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(src)}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:20]


def export_original_cached(loaded: LoadedModel, model: nn.Module, path: str | Path, opset: int = OPSET) -> bool:
    """Export the UNMODIFIED model, reusing a cached export of the same files (returns True on a hit).

    The baseline is identical for every build of a model, and exporting a 30-layer decoder
    takes minutes on a small CPU, so it is done once per model version.
    """
    import shutil

    cached = cache_dir() / "onnx" / _source_key(loaded, opset) / "model.onnx"
    if cached.exists() and not Path(str(cached) + ".data").exists():
        shutil.copyfile(cached, path)
        return True
    export_onnx(loaded, model, path, opset)
    if Path(str(path) + ".data").exists():
        return False  # external-data exports are not cached (their data file name is tied to `path`)
    with atomic_path(cached) as tmp:
        shutil.copyfile(path, tmp)
    return False
