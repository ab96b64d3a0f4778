"""Compare low-rank methods at equal bytes on held-out quality (no export).

For each model and ratio, every VARIANTS entry compresses a fresh copy of the original
model and is scored by verify.quality.QualityProbe on the evaluation split (MiniLM: mean
embedding cosine vs the original + polarity probe accuracy; SmolLM2: perplexity).
Calibration statistics are collected once per model and shared by all variants.

    PYTHONPATH=. python benchmarks/compare_methods.py --models minilm,smollm2 --ratios 0.2,0.35,0.5

Other methods append entries to VARIANTS: (label, method name, {option: value}).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

from factordeploy.compress.calibration import CalibrationConfig
from factordeploy.pipeline import compress_and_score, open_session
from factordeploy.progress import log, set_quiet

VARIANTS: list[tuple[str, str, dict]] = [
    ("svd", "svd", {}),
    ("svd-whiten", "svd-whiten", {}),
    ("fwsvd", "fwsvd", {}),
    ("welore", "welore", {}),
    ("svd + welore alloc", "svd", {"allocation": "welore"}),
    ("svd-whiten + welore alloc", "svd-whiten", {"allocation": "welore"}),
    ("fwsvd + welore alloc", "fwsvd", {"allocation": "welore"}),
    # Training after compression (the old "+ finetune" rows) is the recovery stage: benchmarks/recovery.py.
    # 2:4 (issue 6): sparse24 removes a fixed 46.875% of fp32 bytes whatever --ratio says; compare at
    # equal stored bytes with --ratios 0.46875 (svd / dsformer then store the same bytes).
    ("sparse24 magnitude", "sparse24", {"score": "magnitude"}),
    ("sparse24 wanda", "sparse24", {"score": "wanda"}),
    ("sparse24 sparsegpt", "sparse24", {"score": "sparsegpt"}),
    ("dsformer stf0", "dsformer", {"stf_steps": 0}),
    ("dsformer stf200", "dsformer", {"stf_steps": 200}),
    ("cospadi", "cospadi", {}),
    ("cospadi shared", "cospadi", {"share": "group"}),
    # sparse + low-rank (issue 14): SLTrain's random support (the paper's) vs the residual's largest
    # entries, and LOST's channel block; all within the same bytes, indices counted
    ("sltrain random", "sltrain", {"support": "random"}),
    ("sltrain largest", "sltrain", {"support": "largest"}),
    ("lost", "lost", {}),
]

RESULTS = Path(__file__).parent / "results"


def _fmt(x: float, nd: int) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def cell(kind: str, q: dict) -> str:
    if kind == "decoder":  # above ~1e4 the model is broken and only the order of magnitude matters
        ppl = q["perplexity"]
        return f"{ppl:.2e}" if isinstance(ppl, float) and ppl >= 1e4 else _fmt(ppl, 2)
    return f"{_fmt(q['embedding_cosine_mean'], 3)} / {_fmt(q['polarity_cosine_mean'], 3)} / {_fmt(q['polarity_accuracy'], 3)}"


def markdown(model: str, kind: str, reference: dict, rows: list[dict], ratios: list[float]) -> str:
    metric = ("perplexity (lower is better)" if kind == "decoder" else
              "mean cosine vs original on Wikipedia eval sentences / on polarity sentences / polarity accuracy")
    ref = _fmt(reference["perplexity"], 2) if kind == "decoder" else f"1 / 1 / {_fmt(reference['polarity_accuracy'], 3)}"
    out = [f"### {model}: {metric}; original {ref}", "",
           "| variant | " + " | ".join(f"ratio {r}" for r in ratios) + " |",
           "|---|" + "---:|" * len(ratios)]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        cells = []
        for ratio in ratios:
            hit = [r for r in rows if r["label"] == label and r["ratio"] == ratio]
            cells.append(f"{cell(kind, hit[0]['quality'])} (-{hit[0]['reduction'] * 100:.1f}%)" if hit else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_json(path: Path) -> str:
    """Re-render the markdown table of a results JSON (e.g. after a partial run)."""
    doc = json.loads(Path(path).read_text())
    return markdown(doc["model"], doc["kind"], doc["reference"], doc["rows"], doc["ratios"])


def previous_rows(path: Path, calibration: dict) -> list[dict]:
    """Rows of an earlier run to resume from; refuses one made with other calibration data."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    if doc.get("calibration") != calibration:
        raise click.UsageError(f"{path} was made with calibration {doc.get('calibration')}, not {calibration}; "
                               "pass the same --calib/--calib-len/--seed or another --out")
    return doc["rows"]


@click.command()
@click.option("--models", default="minilm,smollm2", show_default=True)
@click.option("--ratios", default="0.2,0.35,0.5", show_default=True)
@click.option("--variants", default=None, help="comma-separated labels to run (default: all)")
@click.option("--calib", type=int, default=64, show_default=True)
@click.option("--calib-len", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None, help="JSON path, {model} is replaced [default: benchmarks/results/compare_methods-{model}.json]")
@click.option("--render", "render", multiple=True, type=click.Path(exists=True),
              help="only print the table of existing results JSON file(s)")
@click.option("--resume", is_flag=True,
              help="keep the rows already in the output JSON and run only the missing (variant, ratio) pairs")
@click.option("--quiet", is_flag=True)
def main(models, ratios, variants, calib, calib_len, seed, out, render, resume, quiet) -> None:
    set_quiet(quiet)
    if render:
        for p in render:
            click.echo(render_json(Path(p)) + "\n")
        return
    ratio_list = [float(r) for r in ratios.split(",")]
    chosen = [v for v in VARIANTS if variants is None or v[0] in {s.strip() for s in variants.split(",")}]
    RESULTS.mkdir(parents=True, exist_ok=True)
    tables = []
    for model in [m.strip() for m in models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        session = open_session(model, CalibrationConfig(n=calib, length=calib_len, seed=seed), seed=seed)
        kind = session.loaded.kind
        path = Path(out.replace("{model}", model)) if out else RESULTS / f"compare_methods-{model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = previous_rows(path, session.calibration.describe()) if resume else []
        model_ratios = sorted(set(ratio_list) | {r["ratio"] for r in rows})
        for ratio in ratio_list:
            for label, method, opts in chosen:
                if any(r["label"] == label and r["ratio"] == ratio for r in rows):
                    continue
                log(f"== {model} ratio {ratio}: {label}")
                v = compress_and_score(session, method, ratio, opts)
                rows.append({"label": label, "method": method, "options": v.options, "ratio": ratio,
                             "reduction": round(v.reduction, 4), "quality": v.quality,
                             "compress_s": round(v.compress_s, 2), "score_s": round(v.score_s, 2),
                             "notes": v.result.notes,
                             "extra": {k: x for k, x in v.result.extra.items() if k != "rank_table"}})
                log(f"   {cell(kind, v.quality)}  bytes -{v.reduction * 100:.1f}%  compress {v.compress_s:.1f}s")
                doc = {"model": model, "kind": kind, "reference": session.probe.reference,
                       "calibration": session.calibration.describe(), "ratios": model_ratios,
                       "timings_s": session.timings | {"total": round(time.perf_counter() - t0, 1)},
                       "command": " ".join(sys.argv), "rows": rows}
                path.write_text(json.dumps(doc, indent=2, default=str))  # after every row: partial runs survive
        table = markdown(model, kind, session.probe.reference, rows, model_ratios)
        path.with_suffix(".md").write_text(table + "\n")
        tables.append(table)
        click.echo(table + "\n")
        del session


if __name__ == "__main__":
    main()
