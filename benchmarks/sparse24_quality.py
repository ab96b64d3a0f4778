"""Held-out quality of 2:4 methods vs SVD at equal stored bytes (no export).

2:4 at fp32 removes exactly 46.875% of the targeted bytes (kept values + 2-bit metadata), so
svd and dsformer run at --ratio 0.46875 by default and all rows store the same bytes (the
table prints each row's measured reduction). Every variant compresses a fresh copy of the
original model; calibration statistics are collected once and shared. Scores come from
verify.quality.QualityProbe on the evaluation split: MiniLM mean embedding cosine vs the
original + polarity accuracy; SmolLM2 perplexity.

    PYTHONPATH=. python benchmarks/sparse24_quality.py --model minilm --stf-steps 200
    PYTHONPATH=. python benchmarks/sparse24_quality.py --model smollm2 --variants sparse24-wanda,sparse24-sparsegpt,dsformer-stf0,dsformer-stf --stf-steps 20
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import click

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.compress.targets import find_targets
from factordeploy.models.registry import load_model
from factordeploy.progress import log
from factordeploy.verify.quality import EvalConfig, QualityProbe

RESULTS = Path(__file__).parent / "results"


def variants(stf_steps: int) -> list[tuple[str, str, dict]]:
    return [
        ("svd", "svd", {}),
        ("sparse24-magnitude", "sparse24", {"score": "magnitude"}),
        ("sparse24-wanda", "sparse24", {"score": "wanda"}),
        ("sparse24-sparsegpt", "sparse24", {"score": "sparsegpt"}),
        ("dsformer-stf0", "dsformer", {"stf_steps": 0}),
        ("dsformer-stf", "dsformer", {"stf_steps": stf_steps}),
    ]


def fmt(kind: str, q: dict) -> str:
    if kind == "decoder":
        return f"{q['perplexity']:.2f}"
    return f"{q['embedding_cosine_mean']:.4f} | {q['polarity_accuracy']:.3f}"


@click.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--ratio", type=float, default=0.46875, show_default=True, help="for svd and dsformer (2:4 is fixed)")
@click.option("--variants", "chosen", default=None, help="comma-separated labels (default: all)")
@click.option("--stf-steps", type=int, default=200, show_default=True)
@click.option("--stf-lr", type=float, default=1e-4, show_default=True)
@click.option("--calib", type=int, default=64, show_default=True)
@click.option("--calib-len", type=int, default=128, show_default=True)
@click.option("--ppl-windows", type=int, default=12, show_default=True, help="decoders: 512-token evaluation windows")
def main(model: str, ratio: float, chosen: str | None, stf_steps: int, stf_lr: float, calib: int, calib_len: int,
         ppl_windows: int) -> None:
    loaded = load_model(model)
    original = loaded.model
    probe = QualityProbe(loaded, EvalConfig(ppl_windows=ppl_windows))
    ref = probe.capture_original(original)
    cal = Calibration(loaded, CalibrationConfig(n=calib, length=calib_len))
    targets = find_targets(original)
    rows = []
    todo = [v for v in variants(stf_steps) if chosen is None or v[0] in chosen.split(",")]
    for label, method, opts in todo:
        m = copy.deepcopy(original)
        if method == "dsformer":
            opts = {"stf_lr": stf_lr, **opts}
        ctx = CompressContext(ratio=ratio, options=opts, calibration=cal)
        t0 = time.perf_counter()
        res = get_method(method).compress(m, targets, ctx)
        secs = time.perf_counter() - t0
        q = probe.score(m)
        red = 1 - res.bytes_after / res.bytes_before
        rows.append({"label": label, "method": method, "options": opts, "ratio_arg": ratio, "reduction": round(red, 5),
                     "bytes_after": res.bytes_after, "compress_s": round(secs, 1), "quality": q, "notes": res.notes,
                     "extra": {k: v for k, v in res.extra.items() if k != "k"}})
        log(f"{label}: -{red * 100:.2f}% bytes, {fmt(loaded.kind, q)} ({secs:.0f}s)")
        del m
    kind = loaded.kind
    head = "perplexity" if kind == "decoder" else "embedding cosine | polarity acc"
    lines = [f"### {model}: {head} (original: {fmt(kind, ref | {'embedding_cosine_mean': 1.0})}); "
             f"calib {calib} x {calib_len}, STF {stf_steps} steps lr {stf_lr}"
             + (f", perplexity over {ppl_windows} x 512 held-out tokens" if loaded.kind == "decoder" else ""), "",
             f"| variant | targeted bytes removed | {head} | compress s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['reduction'] * 100:.2f}% | {fmt(kind, r['quality'])} | {r['compress_s']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"sparse24-{model}" + ("" if chosen is None else "-" + chosen.replace(",", "_"))
    (RESULTS / f"{tag}.md").write_text(md)
    (RESULTS / f"{tag}.json").write_text(json.dumps({"model": model, "reference": ref, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
