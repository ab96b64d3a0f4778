"""Pretraining at equal parameters and tokens: dense vs low-rank-only vs SLTrain vs LOST.

Each parametrisation is one `deploy pretrain` subprocess (so peak memory is per run), on the same
architecture preset, tokens, batch order and seed; the factorized forms hold equal parameters in their
block linears (pretrain/param.py). Prints a table (held-out perplexity in domain - wiki - and out of
domain - news, pydoc -, parameters, peak RSS, the fp32 training state, tokens/s, wall time) and writes
JSON with every run's held-out curve.

    PYTHONPATH=. python benchmarks/pretrain_compare.py --params 20M --tokens 100000          # what was run (CPU)
    PYTHONPATH=. python benchmarks/pretrain_compare.py --params 60M --tokens 20000000 --device cuda   # a real budget

Each run must stay within the shared machine's heavy-job limit: run it as
`flock /work/locks/heavy.lock python benchmarks/pretrain_compare.py --only sltrain ...` per run and
merge with --resume (rows already in the JSON are kept).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

RESULTS = Path(__file__).parent / "results"
PARAMS = ("dense", "lowrank", "sltrain", "lost")


def row_md(r: dict) -> str:
    p = r["perplexity"]
    return (f"| {r['param']} | {r['block_params']:,} | {r['model_params']:,} | {p['wiki']:.1f} | {p['news']:.1f} | "
            f"{p['pydoc']:.1f} | {r['peak_memory_bytes'] / 2**20:.0f} | {r['train_state_bytes'] / 2**20:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['seconds']:.0f} |")


def table(doc: dict) -> str:
    c = doc["settings"]
    head = (f"### {c['params']} LLaMA, {c['tokens']:,} tokens (seq {c['seq_len']} x batch {c['batch']}), seed {c['seed']}\n\n"
            "| param | block params | model params | ppl wiki (in domain) | ppl news | ppl pydoc | peak RSS MiB | "
            "fp32 train state MiB | tokens/s | seconds |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [row_md(doc["runs"][p]) for p in PARAMS if p in doc["runs"]]
    curves = ["", "Held-out wiki loss by step:", ""] + [
        f"- {p}: " + ", ".join(f"{s}: {v:.3f}" for s, v in doc["runs"][p]["curve"]) for p in PARAMS if p in doc["runs"]]
    return "\n".join([head, *rows, *curves])


@click.command()
@click.option("--params", default="20M", show_default=True)
@click.option("--tokens", type=int, default=100_000, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--eval-windows", type=int, default=16, show_default=True, help="held-out windows per domain")
@click.option("--only", default=",".join(PARAMS), show_default=True, help="comma-separated parametrisations to run")
@click.option("--resume", is_flag=True, help="keep the runs already in the output JSON")
@click.option("--out", default=None, help="JSON path [default: benchmarks/results/pretrain-{params}.json]")
def main(params, tokens, seq_len, batch, seed, device, eval_windows, only, resume, out) -> None:
    settings = {"params": params, "tokens": tokens, "seq_len": seq_len, "batch": batch, "seed": seed, "device": device,
                "eval_windows": eval_windows}
    path = Path(out) if out else RESULTS / f"pretrain-{params}.json"
    doc = {"settings": settings, "runs": {}}
    if resume and path.exists():
        old = json.loads(path.read_text())
        if old["settings"] != settings:
            raise click.UsageError(f"{path} holds runs with settings {old['settings']}; pass the same or another --out")
        doc = old
    for p in [x.strip() for x in only.split(",") if x.strip()]:
        if p not in PARAMS:
            raise click.UsageError(f"unknown parametrisation {p}")
        if p in doc["runs"]:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"pretrain-{p}-"))
        try:
            cmd = [sys.executable, "-m", "factordeploy.cli", "pretrain", "--params", params, "--param", p,
                   "--tokens", str(tokens), "--seq-len", str(seq_len), "--batch", str(batch), "--seed", str(seed),
                   "--device", device, "--eval-windows", str(eval_windows), "--out", str(work / "model")]
            subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            run = json.loads((work / "model" / "pretrain.json").read_text())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        run["param"] = p
        doc["runs"][p] = run
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
    md = table(doc)
    path.with_suffix(".md").write_text(md + "\n")
    plot(doc, path.with_suffix(".png"))
    click.echo(md)


def plot(doc: dict, path: Path) -> None:
    """Held-out wiki loss by step, one curve per parametrisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in PARAMS:
        if p in doc["runs"]:
            xs, ys = zip(*doc["runs"][p]["curve"])
            ax.plot(xs, ys, marker="o", lw=1, label=p)
    c = doc["settings"]
    ax.set_title(f"{c['params']} LLaMA pretraining, {c['tokens']:,} tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out wiki loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
