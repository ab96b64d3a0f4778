"""The sweep's table: sweep.json (every row, machine-readable) and sweep.md (for a person)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .pareto import frontier, quality_value, refolded


def _f(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def write_tables(cfg, rows: list[dict], original: dict, out: Path) -> tuple[Path, Path]:
    kind = "encoder" if any("cosine_mean" in v for r in rows for v in r["quality"].values()) else "decoder"
    higher = kind == "encoder"
    on_front = {}
    for d in cfg.domains:
        pts = [(r["weights_mb"], quality_value(r, d, kind), r["cell"]) for r in [*rows, original]
               if quality_value(r, d, kind) is not None]
        on_front[d] = {p[2] for p in frontier(pts, higher)}
    js = out / "sweep.json"
    js.write_text(json.dumps({"config": asdict(cfg), "kind": kind, "original": original,
                              "rows": [r for r in rows if not r.get("anchor")],
                              "anchors": [r for r in rows if r.get("anchor")],
                              "pareto_size": {d: sorted(v) for d, v in on_front.items()}}, indent=2, default=str) + "\n")
    qname = "embedding cosine vs original" if higher else "perplexity"
    head = ["method", "ratio (auto: budget)", "targeted -%", "weights MB", "model.onnx MB", "latency ms (1 thread)"] + \
           [f"{d} {'(in)' if d == 'wiki' else '(out)'}" for d in cfg.domains] + \
           (["polarity acc"] if higher else []) + ["export check", "on size frontier"]
    lines = [f"# Sweep: {cfg.model}, methods {', '.join(cfg.methods)}, ratios {', '.join(f'{r:g}' for r in cfg.ratios)}"
             + (f", auto at budgets {', '.join(f'{b:g}' for b in cfg.budgets)}" if "auto" in cfg.methods else ""),
             "",
             f"Quality = {qname} of model.onnx (ONNX Runtime) on {', '.join(cfg.domains)}: wiki is the held-out "
             "split (in domain), the others were never calibrated on (out of domain). Latency: ONNX Runtime CPU, "
             "batch 1 x 128, one intra-op thread, all models measured together in alternation (median over "
             f"{cfg.latency_rounds} rounds of each round's median of 3 runs). Calibration: {cfg.calib.n} x "
             f"{cfg.calib.length} tokens, collected once for all cells.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [original, *rows]:
        tr = r.get("targeted_reduction")
        cells = [r["method"] + (" (ORT's quantizer on the original)" if r.get("anchor") else ""),
                 _f(r["ratio"], 2) if r is not original and not r.get("anchor") else "-", _f(None if tr is None else tr * 100, 1),
                 _f(r["weights_mb"]), _f(r.get("onnx_mb")), _f(r.get("latency_ms"))]
        cells += [_f(quality_value(r, d, kind), 4 if higher else 2) for d in cfg.domains]
        if higher:
            cells.append(_f(r.get("polarity_accuracy"), 3))
        ec = r.get("export_check")
        cells.append("-" if ec is None else ("passed" if ec else "FAILED"))
        cells.append(", ".join(d for d in cfg.domains if r["cell"] in on_front[d]) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    folded = [r["cell"] for r in rows if refolded(r)]
    if any(r.get("anchor") for r in rows):
        lines += ["", "ort-w8 / ort-w4: ONNX Runtime's MatMulNBitsQuantizer (block 32, symmetric, RTN) on the original's "
                  "ONNX, the one line a user runs instead; weights MB = its file."]
    lines += ["", "weights MB: bytes the compressed model stores (every factor, index and value at its storage "
              "width); model.onnx MB: the ONNX Runtime file. \"on size frontier\": no other row has both fewer "
              "weight MB and better quality on that domain."]
    if folded:
        lines += ["", f"{', '.join(folded)}: model.onnx refolds {max(refolded(r) for r in rows)} layers to dense matrices "
                  "(the cost model's choice for CPU speed), so that file is not smaller than the original; the TensorRT "
                  "graph and `--ort-sparse-dict gather` keep the compressed form."]
    lines += ["", "Plots: `pareto_size.png` (quality vs stored weight MB), `pareto_latency.png` (quality vs latency).", ""]
    md = out / "sweep.md"
    md.write_text("\n".join(lines))
    return md, js
