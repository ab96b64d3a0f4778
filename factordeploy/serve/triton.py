"""A Triton Inference Server model repository from a build folder, validated against Triton's own schema.

Layout (what `tritonserver --model-repository REPO` reads):

    REPO/<name>/config.pbtxt + 1/model.onnx        onnxruntime backend, dynamic batching
    REPO/<name>_trt/config.pbtxt + 1/model.plan    tensorrt_plan, where a loadable engine was built

Inputs, outputs, element types and dims come from the graph itself (dim_value where fixed,
-1 where dynamic; the leading batch axis becomes `max_batch_size`). Every config.pbtxt is parsed
with `tritonclient.grpc.model_config_pb2.ModelConfig` (google.protobuf.text_format), so a field
Triton does not know fails here, not on the server. Model files are hard-linked (copied across
file systems), so a repository costs no extra disk next to its build folder.

A TensorRT engine goes in only where Triton's TensorRT backend can load it: TensorRT-RTX engines
need the TensorRT-RTX runtime (Triton's backend links TensorRT), and engines with factordeploy
plugin layers need the plugins, which are Python (IPluginV3) objects of this process, not a
shared library Triton could preload. The manifest (`factordeploy_triton.json`) states why a plan
was left out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import UserError
from .folder import external_data_locations

ONNX_TO_TRITON = {
    TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT16: "TYPE_INT16", TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.BOOL: "TYPE_BOOL", TensorProto.STRING: "TYPE_STRING",
}
MANIFEST = "factordeploy_triton.json"


@dataclass
class TensorSpec:
    name: str
    data_type: str
    dims: list[int]  # without the batch axis when the model batches


@dataclass
class TritonModel:
    name: str
    platform: str  # "onnxruntime" (backend) | "tensorrt_plan" (platform)
    file: str
    max_batch_size: int
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


def _dims(vi: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def graph_io(onnx_path: Path, batched: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs/outputs of the graph (initializers excluded); drops the leading batch axis if `batched`."""
    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
        et = vi.type.tensor_type.elem_type
        if et not in ONNX_TO_TRITON:
            raise UserError(f"graph tensor '{vi.name}' has an ONNX element type ({et}) Triton has no type for",
                            "export the model with standard tensor types")
        dims = _dims(vi)
        if batched:
            if not dims or dims[0] != -1:
                raise UserError(f"graph tensor '{vi.name}' has no dynamic leading batch axis ({dims})",
                                "pass --max-batch 0 to write a non-batching config")
            dims = dims[1:]
        return TensorSpec(vi.name, ONNX_TO_TRITON[et], dims)

    return [spec(i) for i in m.graph.input if i.name not in inits], [spec(o) for o in m.graph.output]


def render_config(m: TritonModel, dynamic_batching: bool = True, queue_delay_us: int = 100) -> str:
    """config.pbtxt text (protobuf text format of inference.ModelConfig)."""
    kind = f'backend: "{m.platform}"' if m.platform == "onnxruntime" else f'platform: "{m.platform}"'
    lines = [f'name: "{m.name}"', kind, f"max_batch_size: {m.max_batch_size}",
             f'default_model_filename: "{m.file}"']

    def tensors(key: str, specs: list[TensorSpec]) -> None:
        lines.append(f"{key} [")
        for i, t in enumerate(specs):
            dims = ", ".join(str(d) for d in t.dims)
            lines.append(f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {dims} ] }}'
                         + ("," if i < len(specs) - 1 else ""))
        lines.append("]")

    tensors("input", m.inputs)
    tensors("output", m.outputs)
    if dynamic_batching and m.max_batch_size > 0:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """Parse with Triton's own schema; raises UserError naming the problem."""
    from google.protobuf import text_format

    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:  # pragma: no cover - a dependency
        raise UserError("tritonclient is not installed (it ships Triton's model_config schema)",
                        "pip install 'tritonclient[grpc]'") from e
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise UserError(f"config.pbtxt does not parse with Triton's schema: {e}", "report this as a bug") from e


def validate_repository(repo: Path) -> list[dict]:
    """Parse every config.pbtxt in `repo`; check name == folder and the model file exists. Returns summaries."""
    from google.protobuf import json_format

    repo = Path(repo)
    configs = sorted(repo.glob("*/config.pbtxt"))
    if not configs:
        raise UserError(f"{repo} holds no <model>/config.pbtxt", "write one with `deploy export-triton DIR`")
    out = []
    for p in configs:
        cfg = parse_config(p.read_text())
        if cfg.name != p.parent.name:
            raise UserError(f"{p}: name '{cfg.name}' differs from its folder '{p.parent.name}'", "rename one of them")
        versions = [d for d in p.parent.iterdir() if d.is_dir() and d.name.isdigit()]
        if not versions or not all((v / cfg.default_model_filename).is_file() for v in versions):
            raise UserError(f"{p.parent}: no version folder holds {cfg.default_model_filename}",
                            "re-run `deploy export-triton`")
        d = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
        out.append({"name": cfg.name, "backend": cfg.backend or cfg.platform, "max_batch_size": cfg.max_batch_size,
                    "inputs": [(t["name"], t["data_type"], [int(x) for x in t.get("dims", [])]) for t in d.get("input", [])],
                    "outputs": [(t["name"], t["data_type"], [int(x) for x in t.get("dims", [])]) for t in d.get("output", [])],
                    "dynamic_batching": cfg.HasField("dynamic_batching"), "config": str(p)})
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def model_name(report: dict) -> str:
    raw = f"{report['model']['name']}_{report['method']['name']}_r{report['method']['ratio']}"
    return re.sub(r"[^A-Za-z0-9_]+", "_", raw).strip("_")


def plan_blocker(engine: dict | None) -> str | None:
    """Why the build's engine cannot be a tensorrt_plan model (None = it can)."""
    if not engine or not engine.get("engine_path"):
        return "no TensorRT engine was built (ONNX Runtime backend)"
    if engine.get("backend") == "trt-rtx":
        return ("the engine was built by TensorRT-RTX; Triton's TensorRT backend runs TensorRT engines "
                "(rebuild on a GPU machine with --backend trt)")
    if engine.get("plugin_layers"):
        return (f"the engine has {engine['plugin_layers']} factordeploy plugin layer(s), implemented as Python "
                "plugins Triton cannot load; build with --ort-sparse-dict/standard-op layers or serve model.onnx")
    return None


def write_repository(folder: Path, report: dict, repo: Path, name: str | None = None, max_batch: int = 32) -> dict:
    """Write `repo` from the build `folder` (atomically: a temp sibling moved into place), validate, return manifest."""
    folder, repo = Path(folder), Path(repo)
    name = name or model_name(report)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UserError(f"Triton model name '{name}' has characters Triton repositories do not allow",
                        "use letters, digits, '_', '-' and '.'")
    if repo.exists() and not (repo / MANIFEST).is_file():
        raise UserError(f"{repo} exists and is not a repository this tool wrote (no {MANIFEST})",
                        "pass a new folder to --out, or remove it first")
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = repo.parent / f".{repo.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        models: list[TritonModel] = []
        ort_model = TritonModel(name, "onnxruntime", "model.onnx", max_batch)
        ort_model.inputs, ort_model.outputs = graph_io(folder / "model.onnx", batched=max_batch > 0)
        (tmp / name / "1").mkdir(parents=True)
        _link_or_copy(folder / "model.onnx", tmp / name / "1" / "model.onnx")
        for loc in external_data_locations(folder / "model.onnx"):
            _link_or_copy(folder / loc, tmp / name / "1" / loc)
        models.append(ort_model)

        engine = report.get("engine") or {}
        blocker = plan_blocker(engine)
        if blocker is None:
            trt_name = f"{name}_trt"
            batch_max = int(next(iter(engine.get("profile", {}).values()), {}).get("max", [max_batch])[0])
            trt = TritonModel(trt_name, "tensorrt_plan", "model.plan", batch_max)
            trt.inputs, trt.outputs = graph_io(folder / engine.get("onnx_path", "model.trt.onnx"), batched=True)
            (tmp / trt_name / "1").mkdir(parents=True)
            _link_or_copy(folder / engine["engine_path"], tmp / trt_name / "1" / "model.plan")
            models.append(trt)
        for m in models:
            text = render_config(m)
            parse_config(text)
            (tmp / m.name / "config.pbtxt").write_text(text)
        validated = validate_repository(tmp)
        manifest = {"source": str(folder.resolve()), "models": [asdict(m) for m in models],
                    "tensorrt_plan": "written" if blocker is None else f"not written: {blocker}",
                    "validated_with": "tritonclient.grpc.model_config_pb2.ModelConfig (google.protobuf.text_format)",
                    "validated": [v["name"] for v in validated]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if repo.exists():
            shutil.rmtree(repo)
        os.replace(tmp, repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
