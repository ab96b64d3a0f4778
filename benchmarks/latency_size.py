"""Dense vs compressed ONNX for MiniLM and SmolLM2: ONNX Runtime CPU latency, size, quality.

    python benchmarks/latency_size.py [--models minilm,smollm2] [--method svd] [--runs 20]

Prints a markdown table and writes benchmarks/results/latency_size.json. Each row is a full
`deploy build` (export check included), so the figures are those of the deployable artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factordeploy.build import BuildConfig, run_build  # noqa: E402

DEFAULT_RATIO = {"minilm": 0.5, "smollm2": 0.2}
POINTS = ((1, 32), (1, 128), (8, 128), (1, 512))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--method", default="svd")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        cfg = BuildConfig(model=name, method=args.method, ratio=DEFAULT_RATIO.get(name, 0.5),
                          out=os.path.join(args.out, f"{name}-{args.method}"), latency_points=POINTS,
                          latency_runs=args.runs, overwrite=True)  # the benchmark owns these folders (older runs lack the marker)
        rep = run_build(cfg).report
        q = rep.quality["compressed"]
        qual = (f"ppl {rep.quality['original']['perplexity']:.2f} -> {q['perplexity']:.2f}" if "perplexity" in q
                else f"cos {q['embedding_cosine_mean']:.3f}, polarity {q['polarity_accuracy_original']:.3f} -> {q['polarity_accuracy']:.3f}")
        for p in rep.latency.points:
            rows.append({"model": name, "method": args.method, "ratio": cfg.ratio, "batch": p["batch"], "seq": p["seq"],
                         "dense_ms": p["original"]["median_ms"], "compressed_ms": p["compressed"]["median_ms"],
                         "speedup": p["speedup"], "dense_mb": rep.sizes_on_disk["baseline"] / 1e6,
                         "compressed_mb": rep.sizes_on_disk["model"] / 1e6, "quality": qual,
                         "export_check": rep.fidelity.passed})
    print("| model | method | ratio | batch x seq | dense ms | compressed ms | speedup | dense MB | compressed MB | quality | export check |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['ratio']} | {r['batch']} x {r['seq']} | {r['dense_ms']:.2f} | "
              f"{r['compressed_ms']:.2f} | {r['speedup']:.2f}x | {r['dense_mb']:.1f} | {r['compressed_mb']:.1f} | "
              f"{r['quality']} | {'pass' if r['export_check'] else 'FAIL'} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "latency_size.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
