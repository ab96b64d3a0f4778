"""Recovery benchmark: compress each (model, method, ratio) once, then run every adapter from that
same compressed state at equal steps and data; quality before/after on wiki (in domain) and
news + pydoc (out of domain, never trained or calibrated on). Prints a table, writes JSON
(resumable: finished rows are kept and skipped) and a loss/held-out-KL-vs-steps plot.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/recovery.py --model smollm2 --ratios 0.2 \
        --methods "svd-whiten,cospadi shared,sparse24 sparsegpt" --steps 40 --out benchmarks/results/recovery-smollm2.json
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import click
import torch

from factordeploy.compress.calibration import CalibrationConfig
from factordeploy.pipeline import compress_copy, open_session
from factordeploy.progress import log, set_quiet
from factordeploy.recover import RecoveryConfig, capture_teacher, recover
from factordeploy.verify.quality import DomainProbe, EvalConfig

VARIANTS = {
    "svd-whiten": ("svd-whiten", {}),
    "cospadi shared": ("cospadi", {"share": "group"}),
    "cospadi": ("cospadi", {}),
    "sparse24 sparsegpt": ("sparse24", {"score": "sparsegpt"}),
    "dsformer": ("dsformer", {"stf_steps": 0}),
    "sltrain random": ("sltrain", {"support": "random"}),
    "sltrain largest": ("sltrain", {"support": "largest"}),
    "lost": ("lost", {}),
}

FIXED_RATIO = {"sparse24 sparsegpt"}


def _save(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _key(r: dict) -> tuple:
    return (r["variant"], r["ratio"], r["adapter"], r["steps"], r["data"])


@click.command()
@click.option("--model", default="smollm2")
@click.option("--ratios", default="0.2")
@click.option("--methods", default="svd-whiten,cospadi shared,sparse24 sparsegpt")
@click.option("--adapters", default="none,lora,lora-ggpo,wara")
@click.option("--steps", type=int, default=40)
@click.option("--batch", type=int, default=2)
@click.option("--samples", type=int, default=128, help="training windows")
@click.option("--seq-len", type=int, default=128)
@click.option("--rank", type=int, default=8)
@click.option("--lr", type=float, default=None, help="override every adapter's default learning rate")
@click.option("--data", "data_spec", default="generated")
@click.option("--calib", type=int, default=32)
@click.option("--ppl-windows", type=int, default=4, help="evaluation windows of 512 tokens per domain (decoders)")
@click.option("--sentences", type=int, default=256, help="evaluation sentences per domain (encoders)")
@click.option("--eval-windows", type=int, default=8, help="held-out selection windows (keep-best evaluation)")
@click.option("--eval-every", type=int, default=5)
@click.option("--out", default=None)
@click.option("--render", "render_only", is_flag=True, help="only print the table and redraw the plot of --out")
@click.option("--quiet", is_flag=True)
def main(model, ratios, methods, adapters, steps, batch, samples, seq_len, rank, lr, data_spec, calib, ppl_windows,
         sentences, eval_windows, eval_every, out, render_only, quiet) -> None:
    set_quiet(quiet)
    out = Path(out or f"benchmarks/results/recovery-{model}.json")
    if render_only:
        data = json.loads(out.read_text())
        print(render(data))
        plot(data, out.with_suffix(".png"))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {"model": model, "rows": [], "before": []}
    done = {_key(r) for r in data["rows"]}
    ratios_l = [float(x) for x in ratios.split(",")]
    methods_l = [m.strip() for m in methods.split(",")]
    adapters_l = [a.strip() for a in adapters.split(",")]
    # 2:4 pruning has one fixed pattern (~47% of the bytes) whatever --ratio says: run it at the first ratio only
    todo = [(v, r, a) for v in methods_l for r in (ratios_l[:1] if v in FIXED_RATIO else ratios_l) for a in adapters_l
            if (v, r, a, steps, data_spec) not in done]
    if not todo:
        print(render(data))
        return
    t0 = time.perf_counter()
    session = open_session(model, CalibrationConfig(n=calib, length=seq_len, seed=0),
                           eval_cfg=EvalConfig(ppl_windows=1, sentences=8))  # its own probe is unused here
    loaded = session.loaded
    probe = DomainProbe(loaded, EvalConfig(ppl_windows=ppl_windows, sentences=sentences))
    if "original" not in data or data.get("eval") != {"ppl_windows": ppl_windows, "sentences": sentences}:
        data["original"] = probe.capture_original(loaded.model)
        data["eval"] = {"ppl_windows": ppl_windows, "sentences": sentences}
    else:
        probe.capture_original(loaded.model)  # encoders need the reference embeddings again
    base = RecoveryConfig(steps=steps, rank=rank, lr=lr, batch=batch, data=data_spec, samples=samples, seq_len=seq_len,
                          eval_windows=eval_windows, eval_every=eval_every)
    teacher = capture_teacher(loaded, loaded.model, base)
    data.setdefault("teacher", {})[data_spec] = {"source": teacher.data.source, "seconds": teacher.seconds}
    _save(out, data)
    for variant in methods_l:
        for ratio in ratios_l:
            mine = [a for v, r, a in todo if v == variant and r == ratio]
            if not mine:
                continue
            method, opts = VARIANTS[variant]
            compressed, result, dt = compress_copy(session, method, ratio, opts)
            before = next((b for b in data["before"] if (b["variant"], b["ratio"]) == (variant, ratio)), None)
            if before is None:
                before = {"variant": variant, "ratio": ratio, "reduction": round(1 - result.bytes_after / result.bytes_before, 4),
                          "compress_s": round(dt, 1), "quality": probe.score(compressed)}
                data["before"].append(before)
                _save(out, data)
            log(f"{variant} @ {ratio}: before recovery {before['quality']}")
            for adapter in mine:
                m = copy.deepcopy(compressed)
                cfg = RecoveryConfig(**{**base.__dict__, "adapter": adapter})
                rep = recover(loaded, m, teacher, cfg)
                q = probe.score(m)
                row = {"variant": variant, "ratio": ratio, "adapter": adapter, "steps": steps, "data": data_spec,
                       "quality": q, "before": before["quality"], "lr": rep.config["lr"],
                       "trainable_params": rep.adapter["trainable_params"], "seconds": rep.seconds,
                       "tokens_per_s": rep.train["tokens_per_s"], "peak_memory_mb": round(rep.train["peak_memory_bytes"] / 2 ** 20),
                       "losses": rep.train["losses"], "eval_curve": rep.train["eval_curve"],
                       "best_step": rep.train["best_step"], "bytes_unchanged": rep.bytes_unchanged}
                data["rows"].append(row)
                _save(out, data)
                log(f"{variant} @ {ratio} {adapter}: {q} in {rep.seconds:.0f}s")
                del m
            del compressed
    data.setdefault("runs", []).append({"args": {"steps": steps, "batch": batch, "samples": samples, "seq_len": seq_len,
                                                 "rank": rank, "data": data_spec}, "seconds": round(time.perf_counter() - t0, 1)})
    _save(out, data)
    print(render(data))
    plot(data, out.with_suffix(".png"))


def render(data: dict) -> str:
    orig = data.get("original", {})
    dec = data.get("model") != "minilm"
    what = "perplexity (lower is better)" if dec else "mean embedding cosine to the original (higher is better)"
    lines = [f"### {data['model']}: {what}; original " + ", ".join(f"{d} {v:g}" for d, v in orig.items()), "",
             "| method | ratio | adapter | steps | data | wiki | news | pydoc | train s | peak MB |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for b in data.get("before", []):
        q = b["quality"]
        ratio_cell = f"{b['ratio']} (-{b['reduction'] * 100:.1f}% bytes)"
        lines.append(f"| {b['variant']} | {ratio_cell} | (before recovery) | 0 | - | {q['wiki']:g} | {q['news']:g} | {q['pydoc']:g} | | |")
        for r in data["rows"]:
            if (r["variant"], r["ratio"]) != (b["variant"], b["ratio"]):
                continue
            q = r["quality"]
            cells = []
            for d in ("wiki", "news", "pydoc"):
                rel = f" ({q[d] / orig[d]:.2f}x)" if dec and d in orig else ""
                cells.append(f"{q[d]:g}{rel}")
            lines.append(f"| {r['variant']} | {ratio_cell} | {r['adapter']} | {r['steps']} | {r['data']} | "
                         + " | ".join(cells) + f" | {r['seconds']:.0f} | {r['peak_memory_mb']} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["variant"], r["ratio"]) for r in data["rows"]})
    if not groups:
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 6.5), squeeze=False)
    for j, (v, ratio) in enumerate(groups):
        for r in data["rows"]:
            if (r["variant"], r["ratio"]) != (v, ratio):
                continue
            lab = f"{r['adapter']} ({r['data']})"
            axes[0][j].plot(range(1, len(r["losses"]) + 1), r["losses"], label=lab, lw=1)
            xs, ys = zip(*r["eval_curve"])
            axes[1][j].plot(xs, ys, marker="o", label=lab, lw=1)
        axes[0][j].set_title(f"{data['model']} {v} @ {ratio}")
        axes[0][j].set_ylabel("training distillation loss")
        axes[1][j].set_ylabel("held-out distillation loss (pydoc selection split)")
        axes[1][j].set_xlabel("step")
        axes[0][j].set_yscale("log")
        axes[1][j].set_yscale("log")
        axes[1][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
