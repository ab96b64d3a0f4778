"""Build (and where possible run) a TensorRT / TensorRT-RTX engine from an ONNX file.

Path: plugin creators registered -> parse check (every refused node reported by name and op type,
as a UserError) -> polygraphy NetworkFromOnnxPath -> CreateConfig (one optimization profile from
--batch/--seq, SPARSE_WEIGHTS, timing cache) -> EngineBytesFromNetwork -> SaveBytes. We never use
EngineFromNetwork for the build: it deserializes the engine right after building, which needs a GPU
the engine supports; building bytes works ahead-of-time on a CPU machine.

The builder's log is captured at VERBOSE into a file. Layer count: the engine inspector when the
engine can be deserialized here (a supported GPU), else the engine layer list the VERBOSE builder
log prints after "Layers:" (works ahead-of-time on CPU), else the parsed network's layer count. Sparse-weight lines are read from the log:
TensorRT prints "(Sparsity) Layers eligible for sparse math" / "picked sparse implementation" only
in full-TensorRT builds on a GPU; TensorRT-RTX ahead-of-time builds print none (the engine is
byte-identical with and without the flag), which the result says explicitly instead of guessing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..ranges import INT32
from ..export.onnx_files import check_onnx_file
from ..plugins import register_with_tensorrt
from .trt_module import RTX, TrtInfo, polygraphy_trt


@dataclass
class Range3:
    """min:opt:max of one dynamic axis."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, what: str) -> "Range3":
        try:
            a, b, c = (int(x) for x in text.split(":"))
        except ValueError:
            raise UserError(f"--{what} must be min:opt:max integers, got '{text}'", f"e.g. --{what} 1:8:32") from None
        if c > INT32:
            raise UserError(f"--{what} max {c:,} is beyond what TensorRT takes (int32)", f"e.g. --{what} 1:8:32")
        if not (1 <= a <= b <= c):
            raise UserError(f"--{what} needs 1 <= min <= opt <= max, got {text}", f"e.g. --{what} 1:8:32")
        return cls(a, b, c)


@dataclass
class TrtBuildConfig:
    out_dir: Path
    engine_name: str = "model.engine"
    precision: str = "fp32"
    sparse_weights: bool = False
    batch: Range3 = field(default_factory=lambda: Range3(1, 8, 32))
    seq: Range3 = field(default_factory=lambda: Range3(1, 128, 512))
    timing_cache: Path | None = None  # default: <out_dir>/timing.cache
    log_name: str = "trt-build.log"


@dataclass
class EngineResult:
    backend: str
    trt_version: str
    onnx_path: str
    engine_path: str
    engine_bytes: int
    build_seconds: float
    parse_seconds: float
    layers: int
    layer_source: str
    plugin_layers: int
    network_layers: int
    layer_types: dict[str, int]
    factorized_gemm_layers: int
    precision: str
    sparse_weights: bool
    sparse_log_lines: list[str]
    sparse_note: str
    log_path: str
    timing_cache: str  # "" for TensorRT-RTX (timing caches are no-ops there)
    profile: dict[str, dict[str, list[int]]]
    executed: bool
    reason: str
    comparison: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _CollectingLogger:
    """A TensorRT ILogger that stores messages (the parse check must not print TensorRT's own errors)."""

    def __new__(cls, trt: Any) -> Any:
        class L(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                self.messages.append(f"[{severity.name}] {msg}")

        return L()


def check_parsable(onnx_path: str | Path, info: TrtInfo) -> tuple[int, int, float]:
    """Parse with TensorRT's ONNX parser; refused nodes -> UserError naming each (name, op type, why).

    Returns (network layer count, plugin layer count, seconds)."""
    trt = info.module
    register_with_tensorrt(trt)
    logger = _CollectingLogger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(info))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok or parser.num_errors:
        bad = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            name, op = e.node_name() or f"#{e.node()}", e.node_operator() or "?"
            desc = e.desc().strip().replace("\n", " ")
            bad.append(f"node '{name}' (op_type {op}): {desc[:160]}")
        if not bad:
            bad = [m for m in logger.messages if "ERROR" in m][:3] or ["parser returned failure without errors"]
        raise UserError(f"{info.label} cannot parse {Path(onnx_path).name}: " + "; ".join(bad[:5])
                        + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""),
                        "a custom op needs its package in factordeploy/ops/ (plugin attributes are set by "
                        "trt_pipeline); otherwise use --backend ort")
    n_layers = network.num_layers
    n_plugins = sum(1 for i in range(n_layers) if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
    return n_layers, n_plugins, time.perf_counter() - t0


def _network_flags(info: TrtInfo) -> int:
    """Full TensorRT 10: ask for a strongly typed network (precision from the graph). RTX is always strongly typed."""
    trt = info.module
    if info.flavor != RTX and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _profile_shapes(network: Any, cfg: TrtBuildConfig) -> dict[str, dict[str, list[int]]]:
    """min/opt/max per network input: axis 0 from --batch, axis 1 from --seq (the exporter's dynamic axes).

    A KV-cache decoder (export/kv_cache.py) also has past_key_values.* whose axis 2 (past length)
    ranges 0..seq max, and an attention mask of past + sequence tokens.
    """
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    with_past = any(n.startswith("past_key_values.") for n in names)
    past = Range3(0, cfg.seq.opt, cfg.seq.max)
    total = Range3(cfg.seq.min, 2 * cfg.seq.opt, 2 * cfg.seq.max)
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        mn, op, mx = list(dims), list(dims), list(dims)
        for ax, d in enumerate(dims):
            if d != -1:
                continue
            if with_past and t.name.startswith("past_key_values."):
                r = cfg.batch if ax == 0 else past if ax == 2 else None
            elif with_past and t.name == "attention_mask":
                r = cfg.batch if ax == 0 else total
            else:
                r = cfg.batch if ax == 0 else cfg.seq if ax == 1 else None
            if r is None:
                raise UserError(f"input '{t.name}' has a dynamic axis {ax} with no profile rule",
                                "only batch (axis 0) and sequence (axis 1) may be dynamic")
            mn[ax], op[ax], mx[ax] = r.min, r.opt, r.max
        shapes[t.name] = {"min": mn, "opt": op, "max": mx}
    return shapes


# "sparse"/"sparsity" as a word of TensorRT's own message ("(Sparsity) Layers eligible for sparse math"),
# never inside a name: layer, node and tensor names (fd/<layer>/<kind>/..., module class names,
# sparse_weights) join "sparse" to letters, digits, "_", "/" or "." and so never match.
SPARSE_PAT = re.compile(r"(?<![\w/.])(?:sparsity|sparse)(?![\w/.])", re.IGNORECASE)


def is_sparsity_line(line: str) -> bool:
    """A builder-log line about sparse math, not one that merely names a 2:4 layer."""
    return bool(SPARSE_PAT.search(line))


def build_engine(onnx_path: str | Path, cfg: TrtBuildConfig, info: TrtInfo) -> EngineResult:
    """Build `onnx_path` into cfg.out_dir/cfg.engine_name (the build stage runs verify/ on it where it can run)."""
    from polygraphy.backend.common import SaveBytes
    from polygraphy.logger import G_LOGGER

    check_onnx_file(onnx_path)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / cfg.engine_name
    log_path = out_dir / cfg.log_name
    # TensorRT-RTX 1.2+: "Timing cache operations are no-ops" (its own deprecation warning): only full TensorRT gets one
    cache: Path | None = None
    if info.flavor != RTX:
        cache = Path(cfg.timing_cache) if cfg.timing_cache else out_dir / "timing.cache"

    n_layers, n_plugins, parse_s = check_parsable(onnx_path, info)
    ptrt = polygraphy_trt(info)
    trt = info.module

    old_sev, old_file = G_LOGGER.module_severity, G_LOGGER.log_file  # restored in `finally`
    G_LOGGER.module_severity = G_LOGGER.EXTRA_VERBOSE  # TensorRT VERBOSE maps to polygraphy EXTRA_VERBOSE
    G_LOGGER.log_file = str(log_path)
    sink = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            net_kwargs = {"strongly_typed": True} if info.flavor != RTX else {}
            builder, network, parser = ptrt.NetworkFromOnnxPath(str(onnx_path), **net_kwargs)()
            shapes = _profile_shapes(network, cfg)
            profile = ptrt.Profile()
            for name, s in shapes.items():
                profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
            config = ptrt.CreateConfig(profiles=[profile], sparse_weights=cfg.sparse_weights or None,
                                       load_timing_cache=str(cache) if cache and cache.exists() else None)
            engine_bytes = ptrt.EngineBytesFromNetwork((builder, network, parser), config=config,
                                                       save_timing_cache=str(cache) if cache else None)()
            SaveBytes(engine_bytes, path=str(engine_path))()
    except UserError:
        raise
    except Exception as e:
        tail = [ln for ln in sink.getvalue().splitlines() if "ERROR" in ln or "[E]" in ln][-3:]
        raise UserError(f"{info.label} engine build failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        + (" | " + " | ".join(tail) if tail else ""),
                        f"see {log_path}; or use --backend ort") from e
    finally:
        f = getattr(G_LOGGER, "_log_file", None)
        if f is not None:
            f.close()
        G_LOGGER.log_file = old_file
        G_LOGGER.module_severity = old_sev
    build_s = time.perf_counter() - t0

    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    sparse_lines = [ln.strip() for ln in log_text.splitlines() if is_sparsity_line(ln)][:50]
    if sparse_lines:
        sparse_note = "from the builder log"
    elif not cfg.sparse_weights:
        sparse_note = "SPARSE_WEIGHTS not requested (--sparse-weights)"
    elif info.flavor == RTX:
        sparse_note = ("TensorRT-RTX ahead-of-time builds print no sparsity decisions and store weights dense; which "
                       "layers use 2:4 sparse kernels is only visible in a full TensorRT build on a GPU")
    else:
        sparse_note = "builder log has no sparsity lines: no layer was eligible or none was picked"

    lock = Path(str(cache) + ".lock") if cache else None
    if lock is not None and lock.exists():
        lock.unlink()
    engine_layers = parse_engine_layers(log_text)
    layer_types: dict[str, int] = {}
    for lay in engine_layers:
        layer_types[lay["type"]] = layer_types.get(lay["type"], 0) + 1
    factored_gemms = sum(1 for lay in engine_layers if lay["type"] == "gemm" and "fd/" in lay["name"] + lay["metadata"])
    fused = re.findall(r"After reformat layers: (\d+) layers", log_text)
    if engine_layers:
        layers, layer_source = len(engine_layers), "engine layer list in the builder log"
    elif fused:
        layers, layer_source = int(fused[-1]), "builder log (layers after fusion)"
    else:
        layers, layer_source = n_layers, "parsed network (layers before builder fusion)"
    reason = info.why_not_run
    if info.can_run:
        try:
            layers, layer_source = _inspect_layers(trt, ptrt, engine_path)
            reason = "engine runnable here; not yet run"
        except Exception as e:  # a GPU-side failure must not lose the built engine or the ORT artifact
            reason = f"engine could not be deserialized: {type(e).__name__}: {str(e)[:200]}"

    return EngineResult(
        backend=info.flavor, trt_version=info.version, onnx_path=str(onnx_path), engine_path=str(engine_path),
        engine_bytes=os.path.getsize(engine_path), build_seconds=round(build_s, 3), parse_seconds=round(parse_s, 3),
        layers=layers, layer_source=layer_source, plugin_layers=n_plugins, network_layers=n_layers,
        layer_types=layer_types, factorized_gemm_layers=factored_gemms, precision=cfg.precision,
        sparse_weights=cfg.sparse_weights, sparse_log_lines=sparse_lines, sparse_note=sparse_note,
        log_path=str(log_path), timing_cache=str(cache) if cache else "", profile=shapes, executed=False, reason=reason)


_LAYER_LINE = re.compile(r"^\s+Name: (?P<name>.*?), LayerType: (?P<type>[A-Za-z_0-9]+),(?P<rest>.*)$")


def parse_engine_layers(log_text: str) -> list[dict[str, str]]:
    """The engine's layers as the VERBOSE builder log lists them after "Layers:" (name, type, metadata).

    With TensorRT-RTX the whole transformer becomes one Myelin ForeignNode; this list is its kernels
    (gemm, kgen fusions, runtime fusions, stream signal/wait)."""
    out = []
    in_block = False
    for ln in log_text.splitlines():
        if ln.rstrip().endswith("] Layers:"):
            in_block, out = True, []
            continue
        if in_block:
            m = _LAYER_LINE.match(ln)
            if not m:
                in_block = False
                continue
            meta = m.group("rest").split("Metadata:", 1)[-1].strip()
            out.append({"name": m.group("name"), "type": m.group("type"), "metadata": meta})
    return out


def _inspect_layers(trt: Any, ptrt: Any, engine_path: Path) -> tuple[int, str]:
    """Layer count from the engine inspector (needs a deserialized engine: a supported GPU). Not testable here."""
    import json

    engine = ptrt.EngineFromBytes(ptrt.BytesFromPath(str(engine_path)))()
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return len(info.get("Layers", [])), "engine inspector"
