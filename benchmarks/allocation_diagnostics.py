"""Where does WeLore's global threshold put the ranks? Per projection type, per method.

WeLore allocation min-max normalises each matrix's spectrum and cuts every singular value below
one global tau. This script shows, for each method's own spectrum (plain: W; svd-whiten: W L;
fwsvd: diag(sqrt I) W), the kept-rank fraction per projection type (q/k/v/o/gate/up/down or the
encoder's names), how dominant the top singular value is (s1/s2), and how many matrices stay dense
(rank 0 = N-LRC: factoring would not save bytes at that tau). It explains when the allocation
helps and when it starves a projection type.

    PYTHONPATH=. python benchmarks/allocation_diagnostics.py --model smollm2 --ratios 0.2,0.5 --calib 32
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.budget import allocate_by_threshold, uniform_rank
from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.compress.targets import find_targets
from factordeploy.models.registry import load_model
from factordeploy.pipeline import method_options

RESULTS = Path(__file__).parent / "results"


def projection(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj' (the per-block role of a layer)."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[idx + 1:]) if idx is not None else name


def summarise(method: str, ratio: float, tau: float, ranks: dict[str, int], uniform: dict[str, int],
              spectra: dict, shapes: dict) -> list[dict]:
    rows = []
    for role in dict.fromkeys(projection(n) for n in ranks):
        names = [n for n in ranks if projection(n) == role]
        factored = [ranks[n] / min(shapes[n]) for n in names if ranks[n] > 0]
        top = [float(spectra[n][0] / spectra[n][1]) for n in names]
        rows.append({"method": method, "ratio": ratio, "tau": round(tau, 4), "projection": role,
                     "matrices": len(names), "dense": len(names) - len(factored),
                     "kept_min": round(min(factored), 3) if factored else None,
                     "kept_median": round(statistics.median(factored), 3) if factored else None,
                     "uniform_kept": round(uniform[names[0]] / min(shapes[names[0]]), 3),
                     "s1_over_s2_median": round(statistics.median(top), 2), "s1_over_s2_max": round(max(top), 2)})
    return rows


@click.command()
@click.option("--model", default="smollm2", show_default=True)
@click.option("--methods", default="svd,svd-whiten,fwsvd", show_default=True)
@click.option("--ratios", default="0.2,0.5", show_default=True)
@click.option("--calib", type=int, default=32, show_default=True)
@click.option("--calib-len", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(model, methods, ratios, calib, calib_len, seed) -> None:
    loaded = load_model(model)
    targets = find_targets(loaded.model)
    shapes = {n: tuple(loaded.model.get_submodule(n).weight.shape) for n in targets}
    cal = Calibration(loaded, CalibrationConfig(n=calib, length=calib_len, seed=seed), "cpu")
    rows = []
    for method in [m.strip() for m in methods.split(",")]:
        m = get_method(method)
        ctx = CompressContext(ratio=0.5, device="cpu", seed=seed, calibration=cal,
                              options=method_options(method, {"allocation": "welore"}))
        m.prepare(loaded.model, targets, ctx)  # Grams / Fisher: what the method's spectrum needs
        spectra = {n: m.spectrum(n, loaded.model.get_submodule(n).weight.detach()) for n in targets}
        for ratio in [float(r) for r in ratios.split(",")]:
            alloc = allocate_by_threshold(spectra, shapes, ratio)
            uniform = {n: uniform_rank(o, i, ratio) for n, (o, i) in shapes.items()}
            rows += summarise(method, ratio, alloc.tau, alloc.ranks, uniform, spectra, shapes)
    click.echo("| method | ratio | tau | projection | dense / all | kept rank min / median (uniform) | s1/s2 median / max |")
    click.echo("|---|---:|---:|---|---:|---|---|")
    for r in rows:
        kept = "-" if r["kept_min"] is None else f"{r['kept_min']:.3f} / {r['kept_median']:.3f}"
        click.echo(f"| {r['method']} | {r['ratio']} | {r['tau']} | {r['projection']} | {r['dense']} / {r['matrices']} "
                   f"| {kept} ({r['uniform_kept']:.3f}) | {r['s1_over_s2_median']} / {r['s1_over_s2_max']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"allocation_diagnostics-{model}.json"
    out.write_text(json.dumps({"model": model, "calibration": cal.describe(), "rows": rows}, indent=2))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
