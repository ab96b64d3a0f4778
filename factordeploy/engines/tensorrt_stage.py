"""The build's TensorRT stage: choose the backend, write model.trt.onnx, build the engine, report.

Runs after the ONNX Runtime stage; model.onnx (fp32, standard ops) stays the portable artifact and
the one verified against torch. The TensorRT graph is derived from the same exported model through
trt_pipeline(precision). Any engine failure other than bad input raises a UserError naming the
failing node/step; a TensorRT that builds but cannot run here only sets executed=False + reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from ..progress import log, stage
from .trt_module import choose_backend, describe


def engine_stage(cfg: Any, feeds: list[dict], raw_path: Path, model_path: Path, layers: dict, tmp: Path,
                 timings: dict) -> tuple[dict, dict[str, Path]]:
    """`feeds`: the build's real-text inputs (verify.fidelity.check_plan), for running/checking the engine."""
    from ..passes.pipeline import PassContext, run_pipeline
    from ..passes.presets import trt_pipeline
    from .tensorrt import Range3, TrtBuildConfig, build_engine

    choice = choose_backend(cfg.backend)
    report: dict[str, Any] = {"requested": cfg.backend, "backend": choice.backend, "reason": choice.reason,
                              "precision": cfg.precision if choice.backend != "ort" else "fp32"}
    log(f"backend: {choice.backend} ({choice.reason})")
    if choice.backend == "ort":
        report["executed"] = False
        if cfg.precision != "fp32" or cfg.sparse_weights:
            report["note"] = "--precision/--sparse-weights apply to TensorRT engines only; none was built"
        return report, {}
    info = choice.info
    assert info is not None
    report["tensorrt"] = describe(info)

    trt_onnx = tmp / "model.trt.onnx"
    pctx = PassContext(layers=layers, target="trt")
    with stage(f"graph passes for TensorRT ({cfg.precision})", timings):
        proto = run_pipeline(onnx.load(str(raw_path)), trt_pipeline(cfg.precision), pctx)
        onnx.save_model(proto, str(trt_onnx))
    report["passes"] = pctx.log

    bcfg = TrtBuildConfig(out_dir=tmp, engine_name="model.engine", precision=cfg.precision,
                          sparse_weights=cfg.sparse_weights, batch=Range3.parse(cfg.trt_batch, "batch"),
                          seq=Range3.parse(cfg.trt_seq, "seq"))
    with stage(f"engine build ({info.label})", timings):
        res = build_engine(trt_onnx, bcfg, info, feeds=feeds, ort_model=model_path)
    if not res.executed and cfg.precision == "fp16" and res.plugin_layers == 0:
        with stage("check the fp16 TensorRT graph on ONNX Runtime", timings):
            report["trt_graph_on_ort"] = graph_on_ort(trt_onnx, model_path, feeds)
    d = res.as_dict()
    for k in ("onnx_path", "engine_path", "log_path", "timing_cache"):
        d[k] = Path(d[k]).name if d[k] else ""
    report.update(d)
    log(f"engine: {res.engine_bytes / 1e6:.2f} MB, {res.layers} layers ({res.layer_source}), built in "
        f"{res.build_seconds:.1f} s; executed: {res.executed} ({res.reason})")
    artifacts = {"trt_onnx": trt_onnx, "engine": Path(res.engine_path), "trt_log": Path(res.log_path)}
    if res.timing_cache:
        artifacts["timing_cache"] = Path(res.timing_cache)
    return report, artifacts


def graph_on_ort(trt_onnx: Path, model_path: Path, feeds: list[dict]) -> dict[str, Any]:
    """Where the engine cannot run: the reduced-precision graph TensorRT was given, run by ONNX Runtime
    (CPU) on the build's real-text inputs, against model.onnx (fp32). Checks the precision pass, not
    TensorRT's kernels. bf16 is skipped: ORT's CPU provider has no bf16 kernels for these ops."""
    import numpy as np

    from . import ort as ortmod

    low, ref = ortmod.session(trt_onnx), ortmod.session(model_path)
    max_abs, mean_abs, ref_max = 0.0, [], 0.0
    for f in feeds:
        a, b = ref.run(None, f)[0], low.run(None, f)[0]
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        max_abs = max(max_abs, float(diff.max()))
        mean_abs.append(float(diff.mean()))
        ref_max = max(ref_max, float(np.abs(a).max()))
    return {"max_abs": round(max_abs, 6), "mean_abs": round(float(np.mean(mean_abs)), 7),
            "reference_max_abs": round(ref_max, 4), "nan": bool(max_abs != max_abs), "inputs": len(feeds)}
