"""`deploy build`: the stage list, run inside a temporary folder moved onto --out only on success.

A failure or signal never leaves a half-written artifact: the temporary sibling folder is removed,
and an existing --out is replaced (atomically) only after every stage passed; outdir.py holds the
--out rules, the lock and the swap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import stages as st
from .config import BuildConfig, EngineConfig, check_config, check_engine_config, input_paths  # noqa: F401 (the build's API)
from .outdir import out_transaction
from .progress import log
from .report import Report, write_report

STAGES: tuple[st.Stage, ...] = (
    st.load,             # model on its device, targeted linears, original size
    st.reference,        # quality of the ORIGINAL model, before anything changes it
    st.export_baseline,  # original ONNX (cached) for the latency comparison
    st.teacher,          # --recover-steps: recovery data + the ORIGINAL's outputs on it
    st.calibrate,        # calibration windows, when the method uses them
    st.compress,         # the method replaces the targeted linears; sizes, per-layer records
    st.attention,        # --attention combiner-*: each self-attention core becomes Combiner
    st.recovery,         # --recover-steps: distil toward the original, merge adapters into the factors
    st.quantize_weights,  # --quantize w8|w4|w2: every stored factor block-quantized (and pending corrections)
    st.evaluate,         # quality of the compressed model vs the original's reference
    st.export,           # torch -> raw ONNX (custom ops as custom-domain nodes)
    st.ort_graph,        # passes -> model.onnx (standard ops, custom ops lowered)
    st.ort_session,      # ONNX Runtime loads it; optimized model saved beside it
    st.tensorrt,         # backend choice; model.trt.onnx -> engine; engine/graph checks (verify/)
    st.verify_export,    # polygraphy: compressed torch vs model.onnx on real text
    st.quantize,         # --quantize int8: model.onnx becomes int8; checked and scored again
    st.latency,          # ONNX Runtime latency, original vs compressed
    st.serving_files,    # config/tokenizer for other stacks; ORT-optimized graph kept only if smaller-or-equal and faster
    st.finish,           # artifacts, sizes on disk, versions
)


@dataclass
class BuildResult:
    out: Path
    report: Report


def run_stages(state: st.BuildState, stages: tuple[st.Stage, ...] = STAGES) -> st.BuildState:
    t0 = time.perf_counter()
    for fn in stages:
        fn(state)
    state.timings["total"] = round(time.perf_counter() - t0, 3)
    return state


def run_build(cfg: BuildConfig) -> BuildResult:
    check_config(cfg)
    out = Path(cfg.out)
    with out_transaction(out, cfg.overwrite, input_paths(cfg)) as tmp:  # outdir.py: lock, marker, atomic swap
        state = run_stages(st.BuildState(cfg, tmp))
        write_report(state.report, tmp)
    log(f"artifact: {out / 'model.onnx'}  report: {out / 'report.md'}")
    return BuildResult(out, state.report)
