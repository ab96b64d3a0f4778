"""Run the cells of a sweep, resumably, and score each built model.onnx on three text domains.

OUT/cells/<method>_r<ratio>/ is a normal build folder; OUT/cells/<method>_r<ratio>.json is the
cell's row (config, figures from the build's report, domain quality), written atomically after
the cell is scored. A re-run keeps every cell whose row matches the requested config, re-scores a
finished build folder whose row is missing, and builds the rest. Calibration statistics (Gram
matrices, Fisher, reference embeddings) are stored in OUT/calib-cache keyed by model + calibration
config, so they are collected once per model for all cells (build.BuildConfig.calib_cache) when
the cells calibrate on the original model (`calib_mode="original"`); sequential cells (the default
of the methods that measured better that way) collect their own, block by block.

Quality per cell is measured on model.onnx (the served artifact, through ONNX Runtime) against
the ORIGINAL model on wiki (held-out, in domain) and news / pydoc (out of domain: never
calibrated on), with the same inputs for every cell (verify.domains).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..build import BuildConfig, run_build
from ..config import check_config, check_model_limits
from ..compress.base import get_method
from ..compress.calibration import CalibrationConfig
from ..engines import ort as ortmod
from ..errors import UserError
from ..models.registry import LoadedModel, load_model
from ..models.text import DOMAINS
from ..progress import log
from ..recover.blockwise import BlockwiseConfig
from ..verify.domains import DomainSample, decoder_agreement, encoder_agreement
from ..engines.ort_model import OrtModel


@dataclass
class SweepConfig:
    model: str = "minilm"
    methods: tuple[str, ...] = ("svd", "svd-whiten", "cospadi")
    ratios: tuple[float, ...] = (0.35, 0.5)
    out: str = "build/sweep"
    seed: int = 0
    backend: str = "ort"
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)
    domains: tuple[str, ...] = DOMAINS
    sample: DomainSample = field(default_factory=DomainSample)
    latency_runs: int = 20  # each build's own latency stage
    latency_rounds: int = 10  # the sweep's interleaved measurement of all cells (what the plots use)
    # auto = each method's default (sequential for svd-whiten, cospadi, sparse24, quant-lowrank: their
    # statistics depend on the compressed prefix, so each cell calibrates itself); original = one shared store
    calib_mode: str = "auto"
    # `auto` among the methods is built at each of these budgets (its --budget: stored bytes of the targeted
    # layers as a fraction of fp32) instead of at the ratios; the rows carry the budget in their `ratio` field
    budgets: tuple[float, ...] = (0.1562, 0.25)
    # ONNX Runtime's own weight-only quantizer on the original's ONNX (MatMulNBitsQuantizer, block 32): what a
    # user runs instead of this project, scored and timed beside the cells (rows marked "anchor")
    anchors: tuple[str, ...] = ("ort-w8", "ort-w4")

    def cells(self) -> list[tuple[str, float]]:
        return [(m, r) for m in self.methods for r in (self.budgets if m == AUTO else self.ratios)]


@dataclass
class SweepResult:
    rows: list[dict]
    original: dict
    table_md: Path
    table_json: Path
    plots: list[Path]
    built: int = 0
    reused: int = 0
    anchors: list[dict] = field(default_factory=list)  # ONNX Runtime's w8 / w4 of the original, scored alike


AUTO = "auto"
ANCHOR_BITS = {"ort-w8": 8, "ort-w4": 4}  # SweepConfig.anchors: ONNX Runtime's weight-only quantizer at these bits


def cell_name(method: str, ratio: float) -> str:
    return f"{method}_b{ratio:g}" if method == AUTO else f"{method}_r{ratio:g}"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class DomainScorer:
    """The original model and its outputs on each domain's inputs, computed once for all cells."""

    def __init__(self, loaded: LoadedModel, cfg: SweepConfig) -> None:
        self.loaded, self.cfg = loaded, cfg
        self._ref: dict[str, object] = {}

    def sample(self, domain: str) -> DomainSample:
        s = self.cfg.sample
        return DomainSample(domain, s.seed, s.sentences, s.windows, s.window_len, s.max_len)

    def score(self, model) -> dict[str, dict]:
        out = {}
        for d in self.cfg.domains:
            if self.loaded.kind == "encoder":
                out[d], self._ref[d] = encoder_agreement(self.loaded, self.loaded.model, model, self.sample(d),
                                                         self._ref.get(d))
            else:
                out[d] = decoder_agreement(self.loaded, self.loaded.model, model, self.sample(d), self._ref.get(d))
                self._ref[d] = out[d]["perplexity_original"]
        return out


def row_from_report(rep: dict, folder: Path) -> dict:
    p1 = next((p for p in rep["latency"]["points"] if p["batch"] == 1), rep["latency"]["points"][0])
    q = (rep.get("quality") or {}).get("compressed") or {}
    return {
        "targeted_reduction": rep["size"]["targeted_reduction"],
        "weights_mb": rep["size"]["bytes_after"] / 1e6,
        "onnx_mb": os.path.getsize(folder / "model.onnx") / 1e6,
        "build_latency_ms": p1["compressed"]["median_ms"], "latency_point": f"{p1['batch']}x{p1['seq']}",
        "build_original_latency_ms": p1.get("original", {}).get("median_ms"),
        "export_check": rep["fidelity"]["passed"],
        "polarity_accuracy": q.get("polarity_accuracy"),
        "polarity_accuracy_original": q.get("polarity_accuracy_original"),
        "build_s": rep["timings_s"].get("total"),
        "calibration_reused": ((rep.get("calibration") or {}).get("stats_store") or {}).get("grams_reused", 0),
        "custom_op_lowering": next(({op: {h: n for h, n in d.items() if isinstance(n, int)} for op, d in p["ops"].items()}
                                    for p in rep.get("passes", []) if p["pass"] == "lower-custom-ops" and p.get("ops")), None),
        # layers model.onnx stores refolded to a dense matrix (fast on CPU, no bytes saved in that file)
        "refolded_layers": sum(d.get(h, 0) for p in rep.get("passes", []) if p["pass"] == "lower-custom-ops"
                               for d in (p.get("ops") or {}).values() for h in d.get("refolding", [])),
    }


def cell_config(cfg: SweepConfig, method: str, ratio: float, cells_dir: Path) -> BuildConfig:
    m = get_method(method)
    # a sweep-wide `sequential` applies to the cells whose method calibrates block-wise; the others keep their own
    mode = cfg.calib_mode if cfg.calib_mode != "sequential" or (m.blockwise and m.uses_calibration({})) else "auto"
    if method == AUTO:  # the cell's `ratio` is auto's byte budget
        return BuildConfig(model=cfg.model, method=method, options={"budget": ratio}, out=str(cells_dir / cell_name(method, ratio)),
                           seed=cfg.seed, calib=cfg.calib, backend=cfg.backend, calib_cache=str(cells_dir.parent / "calib-cache"),
                           latency_points=((1, 128),), latency_runs=cfg.latency_runs, blockwise=BlockwiseConfig(mode))
    return BuildConfig(model=cfg.model, method=method, ratio=ratio, out=str(cells_dir / cell_name(method, ratio)),
                       seed=cfg.seed, calib=cfg.calib, backend=cfg.backend, calib_cache=str(cells_dir.parent / "calib-cache"),
                       latency_points=((1, 128),), latency_runs=cfg.latency_runs,
                       blockwise=BlockwiseConfig(mode))


def run_sweep(cfg: SweepConfig) -> SweepResult:
    for m in cfg.methods:
        get_method(m)
    for r in cfg.ratios:
        if not 0 < r < 1:
            raise UserError(f"ratio {r} is outside (0, 1)", "pass e.g. --ratios 0.35,0.5")
    for b in cfg.budgets if AUTO in cfg.methods else ():
        if not 0 < b <= 1:
            raise UserError(f"budget {b} is outside (0, 1]", "pass e.g. --budgets 0.1562,0.25")
    bad = [a for a in cfg.anchors if a not in ANCHOR_BITS]
    if bad:
        raise UserError(f"--anchors: unknown anchor(s) {', '.join(bad)}",
                        f"use {' and/or '.join(ANCHOR_BITS)}, or '' for none")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", "choose a folder path for --out")
    cells_dir = out / "cells"
    # every cell's settings, and the model-dependent limits once config.json is read: all before --out is touched
    cell_cfgs = [cell_config(cfg, m, r, cells_dir) for m, r in cfg.cells()]
    for c in cell_cfgs:
        check_config(c)
    loaded = load_model(cfg.model, on_config=lambda shape: [check_model_limits(c, shape) for c in cell_cfgs])
    cells_dir.mkdir(parents=True, exist_ok=True)
    scorer = DomainScorer(loaded, cfg)
    rows, built, reused = [], 0, 0
    cells = cfg.cells()
    for i, (method, ratio) in enumerate(cells, 1):
        name = cell_name(method, ratio)
        folder, row_path = cells_dir / name, cells_dir / f"{name}.json"
        want = {"model": cfg.model, "method": method, "ratio": ratio, "seed": cfg.seed, "backend": cfg.backend,
                "calib": asdict(cfg.calib), "sample": asdict(cfg.sample), "domains": list(cfg.domains)}
        if row_path.is_file():
            row = json.loads(row_path.read_text())
            if row.get("config") == want and (folder / "report.json").is_file():
                log(f"cell {i}/{len(cells)} {name}: finished earlier, kept")
                rows.append(row)
                reused += 1
                continue
        rep_path = folder / "report.json"
        rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
        same_build = rep is not None and rep["method"]["name"] == method and (
            rep["method"]["options"].get("budget") == ratio if method == AUTO else rep["method"]["ratio"] == ratio)
        if not same_build:
            log(f"cell {i}/{len(cells)} {name}: building")
            rep = run_build(cell_config(cfg, method, ratio, cells_dir)).report.to_dict()
            built += 1
        else:
            log(f"cell {i}/{len(cells)} {name}: build folder finished earlier, scoring it")
            reused += 1
        log(f"cell {i}/{len(cells)} {name}: quality of model.onnx on {', '.join(cfg.domains)}")
        row = {"config": want, "cell": name, "method": method, "ratio": ratio, **row_from_report(rep, folder),
               "quality": scorer.score(OrtModel(folder / "model.onnx"))}
        _write_json(row_path, row)
        rows.append(row)

    original = original_row(loaded, rows, out)
    anchors = anchor_rows(cfg, rows, out, scorer)
    measure_latencies(loaded, [*rows, *anchors], original, out, cfg)
    from .pareto import write_plots
    from .table import write_tables

    md, js = write_tables(cfg, [*rows, *anchors], original, out)
    plots = write_plots(cfg, loaded.kind, [*rows, *anchors], original, out)
    return SweepResult(rows, original, md, js, plots, built, reused, anchors)


def _baseline(rows: list[dict], out: Path) -> Path | None:
    return next((out / "cells" / r["cell"] / "baseline.onnx" for r in rows
                 if (out / "cells" / r["cell"] / "baseline.onnx").is_file()), None)


def measure_latencies(loaded: LoadedModel, rows: list[dict], original: dict, out: Path, cfg: SweepConfig) -> None:
    """Every cell's model.onnx and the original, measured together in alternation on one ORT thread.

    Each build measured its own latency at its own time; on a shared CPU those figures are not
    comparable across cells (other jobs come and go). The plots use these instead.
    """
    base = _baseline(rows, out)
    paths = [Path(r["onnx_path"]) if r.get("onnx_path") else out / "cells" / r["cell"] / "model.onnx"
             for r in rows] + ([base] if base else [])
    log(f"latency of {len(paths)} models, interleaved (ONNX Runtime, 1 thread, batch 1 x 128)")
    vocab = int(getattr(loaded.model.config, "vocab_size", 1000))
    ms = ortmod.interleaved_latency(paths, 1, 128, vocab, rounds=cfg.latency_rounds, runs_per_round=3, threads=1)
    for r, m in zip(rows, ms):
        r["latency_ms"] = m
    original["latency_ms"] = ms[-1] if base else None
    for r in [*rows, original]:
        r["latency_point"] = "1x128, 1 thread"


def anchor_rows(cfg: SweepConfig, rows: list[dict], out: Path, scorer: DomainScorer) -> list[dict]:
    """ONNX Runtime's quantizer on the original (a cell's baseline.onnx), each scored like a cell; cached
    in OUT/anchors/<name>.onnx and .json. None without a baseline (every cell built with --no-baseline)."""
    from ..engines.quantize import ort_weight_only

    base = _baseline(rows, out)
    if base is None or not cfg.anchors:
        return []
    folder = out / "anchors"
    folder.mkdir(exist_ok=True)
    found = []
    for name in cfg.anchors:
        path, row_path = folder / f"{name}.onnx", folder / f"{name}.json"
        want = {"model": cfg.model, "anchor": name, "sample": asdict(cfg.sample), "domains": list(cfg.domains)}
        saved = json.loads(row_path.read_text()) if row_path.is_file() and path.is_file() else {}
        if saved.get("config") == want:
            found.append(saved)
            continue
        log(f"anchor {name}: ONNX Runtime's MatMulNBitsQuantizer on the original (block 32, symmetric, RTN)")
        ort_weight_only(base, path, ANCHOR_BITS[name], 32)
        mb = os.path.getsize(path) / 1e6
        row = {"config": want, "cell": name, "method": name, "anchor": True, "ratio": 0.0, "targeted_reduction": None,
               "weights_mb": mb, "onnx_mb": mb, "onnx_path": str(path), "export_check": None,
               "quality": scorer.score(OrtModel(path))}
        _write_json(row_path, row)
        found.append(row)
    return found


def original_row(loaded: LoadedModel, rows: list[dict], out: Path) -> dict:
    """The uncompressed model as a reference point (same metrics)."""
    from ..stages import model_bytes

    base = _baseline(rows, out)
    q = {}
    for r in rows[:1]:
        for d, v in r["quality"].items():
            q[d] = ({"cosine_mean": 1.0, "cosine_min": 1.0} if loaded.kind == "encoder"
                    else {"perplexity": v["perplexity_original"], "perplexity_ratio": 1.0})
    return {"cell": "original", "method": "original", "ratio": 0.0, "targeted_reduction": 0.0,
            "weights_mb": model_bytes(loaded.model)[1] / 1e6,
            "onnx_mb": os.path.getsize(base) / 1e6 if base else None,
            "quality": q, "export_check": None,
            "polarity_accuracy": next((r.get("polarity_accuracy_original") for r in rows), None)}
