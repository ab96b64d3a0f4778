"""Per-layer calibration error of sltrain / lost against whitened SVD at equal bytes (no export, no eval).

For each variant (support, alternating iterations), compresses the first blocks of a model and
reports, over layers, the ratio ||X (W - W_hat)^T|| / ||X (W - W_svd)^T|| with W_svd the whitened SVD
storing the same bytes (< 1: the sparse + low-rank form fits the calibration activations better).

    PYTHONPATH=. python benchmarks/sparse_lowrank_layers.py --model minilm --blocks 2 --ratio 0.5
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import click
import torch

from factordeploy.compress.base import CompressContext, get_method, method_options
from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.compress.targets import find_targets
from factordeploy.models.registry import load_model

VARIANTS = [("sltrain random, 1 iter", "sltrain", {"support": "random", "alt_iters": 1}),
            ("sltrain random, 2 iters", "sltrain", {"support": "random", "alt_iters": 2}),
            ("sltrain random, 4 iters", "sltrain", {"support": "random", "alt_iters": 4}),
            ("sltrain largest, 2 iters", "sltrain", {"support": "largest", "alt_iters": 2}),
            ("sltrain largest, 4 iters", "sltrain", {"support": "largest", "alt_iters": 4}),
            ("lost, 2 iters", "lost", {"alt_iters": 2}),
            ("lost, 4 iters", "lost", {"alt_iters": 4})]


@click.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--blocks", type=int, default=2, show_default=True, help="first N blocks' linears")
@click.option("--ratio", type=float, default=0.5, show_default=True)
@click.option("--calib", type=int, default=32, show_default=True)
@click.option("--calib-len", type=int, default=128, show_default=True)
@click.option("--out", default=None, help="JSON path [default: benchmarks/results/sparse_lowrank_layers-{model}.json]")
def main(model, blocks, ratio, calib, calib_len, out) -> None:
    torch.set_num_threads(1)
    loaded = load_model(model)
    cal = Calibration(loaded, CalibrationConfig(n=calib, length=calib_len, seed=0))
    all_t = find_targets(loaded.model)
    per_block = len(all_t) // loaded.model.config.num_hidden_layers
    targets = all_t[: blocks * per_block]
    rows = []
    for label, method, opts in VARIANTS:
        m = copy.deepcopy(loaded.model)
        res = get_method(method).compress(m, targets, CompressContext(ratio=ratio, options=method_options(method, opts),
                                                                      calibration=cal))
        r = [x.metrics["calib_rel_error"] / x.metrics["svd_calib_rel_error"] for x in res.layers]
        rows.append({"variant": label, "median": round(statistics.median(r), 4), "min": round(min(r), 4),
                     "max": round(max(r), 4), "better_than_svd": sum(v < 1 for v in r), "layers": len(r)})
    md = [f"### {model}: first {blocks} blocks ({len(targets)} layers), ratio {ratio}, calibration {calib} x {calib_len}",
          "", "| variant | median err / whitened SVD | min | max | layers better than SVD |", "|---|---:|---:|---:|---:|"]
    md += [f"| {r['variant']} | {r['median']} | {r['min']} | {r['max']} | {r['better_than_svd']}/{r['layers']} |" for r in rows]
    path = Path(out) if out else Path(__file__).parent / "results" / f"sparse_lowrank_layers-{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "blocks": blocks, "ratio": ratio, "calib": [calib, calib_len],
                                "rows": rows}, indent=1))
    click.echo("\n".join(md))


if __name__ == "__main__":
    main()
