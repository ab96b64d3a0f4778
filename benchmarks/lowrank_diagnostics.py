"""Why do (or don't) the data-aware methods beat SVD? Per-layer error diagnostics at one ratio.

For each targeted layer (MiniLM by default) at the uniform rank for --ratio, compare plain
SVD, svd-whiten and fwsvd factors on three error measures:
  weight  ||W - BA|| / ||W||
  output  ||X (W - BA)^T|| / ||X W^T||  on the calibration activations (Gram)
  fisher  sum_i I_i ||W_i - (BA)_i||^2 / sum_i I_i ||W_i||^2  with FWSVD's row importance
and report how uneven the Fisher row importance is (max/median, share of the top 10% rows).

    PYTHONPATH=. python benchmarks/lowrank_diagnostics.py --model minilm --ratio 0.5
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click
import torch

from factordeploy.compress.budget import uniform_rank
from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.compress.fisher import fisher_diagonal, row_importance
from factordeploy.compress.linalg import gram_factor, output_error, row_weighted_svd, truncated_svd, whitened_svd
from factordeploy.compress.objective import TaskObjective
from factordeploy.compress.targets import find_targets
from factordeploy.models.registry import load_model


def _errors(W, f, G, imp) -> dict:
    W_hat = f.B.double() @ f.A.double()
    E = W - W_hat
    ref = output_error(W, torch.zeros_like(W), G)
    return {"weight": float(E.norm() / W.norm()),
            "output": output_error(W, W_hat, G) / ref,
            "fisher": float((imp[:, None] * E ** 2).sum() / (imp[:, None] * W ** 2).sum()) ** 0.5}


@click.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--ratio", type=float, default=0.5, show_default=True)
@click.option("--calib", type=int, default=64, show_default=True)
@click.option("--calib-len", type=int, default=128, show_default=True)
@click.option("--out", default="benchmarks/results/lowrank_diagnostics-{model}.json", show_default=True)
def main(model, ratio, calib, calib_len, out) -> None:
    loaded = load_model(model)
    m = loaded.model
    targets = find_targets(m)
    cal = Calibration(loaded, CalibrationConfig(n=calib, length=calib_len))
    grams = cal.grams(m, targets)
    fisher = fisher_diagonal(m, targets, cal, TaskObjective(cal, m), reduce="row")
    rows = []
    for name in targets:
        W = m.get_submodule(name).weight.detach().double()
        r = uniform_rank(*W.shape, ratio)
        imp = row_importance(fisher[name])
        srt = imp.sort(descending=True).values
        row = {"layer": name, "rank": r,
               "importance_max_over_median": float(imp.max() / imp.median()),
               "importance_top10pct_share": float(srt[: max(1, len(srt) // 10)].sum() / srt.sum())}
        for label, f in (("svd", truncated_svd(W, r)), ("svd-whiten", whitened_svd(W, gram_factor(grams[name]), r)),
                         ("fwsvd", row_weighted_svd(W, imp, r))):
            row[label] = _errors(W, f, grams[name], imp)
        rows.append(row)
    print(f"| layer | rank | Fisher max/median | top-10% share | svd w/out/fisher | svd-whiten w/out/fisher | fwsvd w/out/fisher |")
    print("|---|---:|---:|---:|---|---|---|")
    for row in rows:
        cells = [" / ".join(f"{row[k][e]:.3f}" for e in ("weight", "output", "fisher")) for k in ("svd", "svd-whiten", "fwsvd")]
        print(f"| {row['layer']} | {row['rank']} | {row['importance_max_over_median']:.1f} | "
              f"{row['importance_top10pct_share']:.2f} | " + " | ".join(cells) + " |")
    summary = {k: {e: statistics.mean(r[k][e] for r in rows) for e in ("weight", "output", "fisher")}
               for k in ("svd", "svd-whiten", "fwsvd")}
    print("\nmean over layers:", json.dumps(summary, indent=1))
    p = Path(out.replace("{model}", model))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"model": model, "ratio": ratio, "calibration": cal.describe(), "layers": rows,
                             "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
