"""Block-wise compression benchmark (issue 21): original vs sequential calibration, block
reconstruction off / on, per method and ratio; quality on wiki (in domain) and news + pydoc (out of
domain, never calibrated or trained on), compress time on this machine. Prints a table, writes
JSON after every row (rerunning skips finished rows).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/blockwise.py --model minilm --ratios 0.5 \
        --methods "svd-whiten,cospadi,sparse24 sparsegpt" --modes original,sequential --steps 0,100 \
        --out benchmarks/results/blockwise-minilm.json

Each row runs the build's compress stage (pipeline.compress_copy -> stages.compress) with a
`BlockwiseConfig`, so what is measured is what `deploy build --calib-mode ... --reconstruct-steps ...`
does. `--curve` also scores reconstruction step counts (quality vs steps).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from factordeploy.compress.calibration import CalibrationConfig
from factordeploy.pipeline import compress_copy, open_session
from factordeploy.progress import log, set_quiet
from factordeploy.recover.blockwise import BlockwiseConfig, ReconstructConfig
from factordeploy.verify.quality import DomainProbe, EvalConfig

VARIANTS = {
    "svd-whiten": ("svd-whiten", {}),
    "svd-whiten measured": ("svd-whiten", {"allocation": "measured"}),
    "svd-whiten welore": ("svd-whiten", {"allocation": "welore"}),
    "cospadi": ("cospadi", {}),
    "cospadi shared": ("cospadi", {"share": "group"}),
    "sparse24 sparsegpt": ("sparse24", {"score": "sparsegpt"}),
    "sparse24 wanda": ("sparse24", {"score": "wanda"}),
    "sltrain largest": ("sltrain", {"support": "largest"}),
    "lost": ("lost", {}),
    "svd": ("svd", {}),
    # quantized forms (issue 20) calibrate too: GPTQ on the Grams, the correction on the whitened residual
    "w4-gptq": ("quant-lowrank", {"bits": 4, "lowrank_bytes": 0.0}, {"quant_algo": "gptq"}),
    "ql4-gptq": ("quant-lowrank", {"bits": 4, "lowrank_bytes": 0.02}, {"quant_algo": "gptq"}),
    "ql2-gptq": ("quant-lowrank", {"bits": 2, "lowrank_bytes": 0.05}, {"quant_algo": "gptq"}),
}
FIXED_BYTES = {"w4-gptq", "ql4-gptq", "ql2-gptq"}  # bytes follow from bits and rank, not from --ratio
FIXED_RATIO = {"sparse24 sparsegpt", "sparse24 wanda"}


def _save(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


@click.command()
@click.option("--model", default="minilm")
@click.option("--ratios", default="0.5")
@click.option("--methods", default="svd-whiten,cospadi,sparse24 sparsegpt")
@click.option("--modes", default="original,sequential")
@click.option("--steps", "steps_s", default="0,100", help="reconstruction steps per block (comma list; 0 = off)")
@click.option("--lr", type=float, default=None)
@click.option("--mix", type=float, default=0.0)
@click.option("--calib", type=int, default=128)
@click.option("--calib-len", type=int, default=128)
@click.option("--ppl-windows", type=int, default=4, help="evaluation windows of 512 tokens per domain (decoders)")
@click.option("--sentences", type=int, default=256, help="evaluation sentences per domain (encoders)")
@click.option("--out", default=None)
@click.option("--render", "render_only", is_flag=True)
@click.option("--quiet", is_flag=True)
def main(model, ratios, methods, modes, steps_s, lr, mix, calib, calib_len, ppl_windows, sentences, out, render_only,
         quiet) -> None:
    set_quiet(quiet)
    out = Path(out or f"benchmarks/results/blockwise-{model}.json")
    if render_only:
        print(render(json.loads(out.read_text())))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {"model": model, "rows": []}
    calib_cfg = {"n": calib, "length": calib_len, "seed": 0}
    if data.get("calibration", calib_cfg) != calib_cfg:
        raise click.UsageError(f"{out} was made with calibration {data['calibration']}; pass the same --calib or another --out")
    data["calibration"] = calib_cfg
    key = lambda r: (r["variant"], r["ratio"], r["mode"], r["steps"], r.get("lr"), r.get("mix", 0.0))  # noqa: E731
    done = {key(r) for r in data["rows"]}
    ratios_l = [float(x) for x in ratios.split(",")]
    todo = [(v, r, m, int(s)) for v in [x.strip() for x in methods.split(",")]
            for r in (ratios_l[:1] if v in FIXED_RATIO | FIXED_BYTES else ratios_l)
            for m in modes.split(",") for s in steps_s.split(",")
            if (v, r, m, int(s), lr if int(s) else None, mix if int(s) else 0.0) not in done]
    if not todo:
        print(render(data))
        return
    session = open_session(model, CalibrationConfig(n=calib, length=calib_len, seed=0),
                           eval_cfg=EvalConfig(ppl_windows=1, sentences=8), evaluate=False)
    loaded = session.loaded
    probe = DomainProbe(loaded, EvalConfig(ppl_windows=ppl_windows, sentences=sentences))
    orig = probe.capture_original(loaded.model)
    data["original"] = orig
    data["eval"] = {"ppl_windows": ppl_windows, "sentences": sentences}
    for variant, ratio, mode, steps in todo:
        method, opts, *build = VARIANTS[variant]
        bw = BlockwiseConfig(mode, ReconstructConfig(steps=steps, lr=lr, mix=mix))
        log(f"== {model} {variant} @ {ratio}: calib {mode}, reconstruct {steps}")
        m, result, dt = compress_copy(session, method, ratio, opts, bw, build[0] if build else None)
        t0 = time.perf_counter()
        q = probe.score(m)
        rec = result.extra.get("blockwise", {}).get("reconstruction", [])
        row = {"variant": variant, "ratio": ratio, "mode": mode, "steps": steps, "lr": lr if steps else None,
               "mix": mix if steps else 0.0, "reduction": round(1 - result.bytes_after / result.bytes_before, 4),
               "compress_s": round(dt, 1), "score_s": round(time.perf_counter() - t0, 1), "quality": q,
               "unit_errors": [{k: u.get(k) for k in ("error_start", "error_closed_form", "error_end", "best_step",
                                                      "eval_curve")} for u in rec],
               "notes": result.notes}
        data["rows"].append(row)
        _save(out, data)
        log(f"   {q}  compress {dt:.0f}s")
        del m
    print(render(data))


def render(data: dict) -> str:
    orig = data.get("original", {})
    dec = data.get("model") != "minilm"
    what = ("perplexity, x = ratio to the original's (lower is better)" if dec else
            "mean embedding cosine to the original (higher is better)")
    lines = [f"### {data['model']}: {what}; original " + ", ".join(f"{d} {v:.4g}" for d, v in orig.items())
             + f"; calibration {data.get('calibration')}", "",
             "| method | ratio (bytes removed) | calibration | reconstruct steps | wiki | news | pydoc | worst | build s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(data["rows"], key=lambda r: (r["variant"], r["ratio"], r["mode"], r["steps"])):
        q = r["quality"]
        if dec:
            rel = {d: q[d] / orig[d] for d in ("wiki", "news", "pydoc")}
            cells = [f"{q[d]:.4g} ({rel[d]:.2f}x)" for d in ("wiki", "news", "pydoc")]
            worst = f"{max(rel.values()):.2f}x"
        else:
            cells = [f"{q[d]:.4f}" for d in ("wiki", "news", "pydoc")]
            worst = f"{min(q[d] for d in ('wiki', 'news', 'pydoc')):.4f}"
        steps = str(r["steps"]) + (f" (lr {r['lr']:g})" if r.get("lr") else "") + (f" mix {r['mix']:g}" if r.get("mix") else "")
        lines.append(f"| {r['variant']} | {r['ratio']} (-{r['reduction'] * 100:.1f}%) | {r['mode']} | {steps} | "
                     + " | ".join(cells) + f" | {worst} | {r['compress_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
