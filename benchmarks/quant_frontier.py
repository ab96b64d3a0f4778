"""Quality vs bytes on disk (and decode speed) of the project's quantized artifacts beside ONNX Runtime's own
quantizer on the same original, in one run (issue 20).

Anchors, made here from the same original ONNX (the project's export, constant-folded by the ORT pass list):
  ort-w8 / ort-w4     `MatMulNBitsQuantizer(bits, block_size=32, is_symmetric=True)` (RTN), accuracy_level 4
                      (int8 activations: the fast CPU kernel; the project's artifacts run at the same level)
  ort-w4+gather       the same with `op_types_to_quantize=("MatMul", "Gather")` (ORT also quantizes the
                      embedding table: the strongest one-line anchor on file bytes)
  ort-int8            `quantize_dynamic` int8 per channel (Optimum's path; today's `--quantize int8`)
Project points: real `deploy build`s (run_build, --backend ort, the build's own export check), one per
--points entry, each `name=deploy build flags`. Every artifact (anchors too) is scored as the ORT file
itself against the original fp32 torch model, on the in-domain split (wiki) and on out-of-domain text
no step calibrated on (news, pydoc): MiniLM mean embedding cosine, SmolLM2 perplexity ratio. Decoders
also get decode tokens/s (`deploy generate`'s loop, batch 1, --threads), and the RACE rows (ORT's w4 / w8 and
the project's points at equal bytes) are timed again together in one interleaved loop, the figure to compare
speeds by. Resumable: finished rows are kept in the JSON and skipped.

    PYTHONPATH=. python benchmarks/quant_frontier.py --model minilm --calib 32
    PYTHONPATH=. python benchmarks/quant_frontier.py --model smollm2 --calib 32 --points smollm2

Prints a table, writes benchmarks/results/quant-frontier-<model>.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DOMAINS = ("wiki", "news", "pydoc")  # wiki: in domain (held-out split); news, pydoc: never calibrated on
ANCHORS = ("original", "ort-w8", "ort-w4", "ort-w4+gather", "ort-int8")
POINTS = {
    "minilm": [
        "w4=--method quant-lowrank --bits 4 --lowrank-bytes 0",
        "w4-gptq=--method quant-lowrank --bits 4 --lowrank-bytes 0 --quant-algo gptq",
        "ql4-gptq=--method quant-lowrank --bits 4 --lowrank-bytes 0.02 --quant-algo gptq",
        "ql4-gptq-b64=--method quant-lowrank --bits 4 --lowrank-bytes 0.02 --quant-block 64 --quant-algo gptq",
        "w8+emb=--method quant-lowrank --bits 8 --lowrank-bytes 0 --quantize w8 --quantize-head",
        "ql4-gptq+emb=--method quant-lowrank --bits 4 --lowrank-bytes 0.02 --quant-algo gptq --quantize w8 --quantize-head",
        "w4-gptq+emb4=--method quant-lowrank --bits 4 --lowrank-bytes 0 --quant-algo gptq --quantize-head --embedding-bits 4",
        "ql4-gptq+emb4=--method quant-lowrank --bits 4 --lowrank-bytes 0.02 --quant-algo gptq --quantize-head --embedding-bits 4",
        "w8+emb4=--method quant-lowrank --bits 8 --lowrank-bytes 0 --quantize-head --embedding-bits 4",
        "svd-whiten-0.3+w8=--method svd-whiten --ratio 0.3 --quantize w8",
        "svd-whiten-0.1+w4=--method svd-whiten --ratio 0.1 --quantize w4 --quant-algo gptq",
        "sparse24+w8=--method sparse24 --score sparsegpt --quantize w8",
        "sparse24+w4=--method sparse24 --score sparsegpt --quantize w4 --quant-algo gptq",
        "cospadi-0.3+w8=--method cospadi --ratio 0.3 --quantize w8",
    ],
    "smollm2": [
        "w8+emb4=--method quant-lowrank --bits 8 --lowrank-bytes 0 --quantize-head --embedding-bits 4",
        "ql4-gptq+emb4=--method quant-lowrank --bits 4 --lowrank-bytes 0.02 --quant-algo gptq --quantize-head --embedding-bits 4",
        "w4-gptq=--method quant-lowrank --bits 4 --lowrank-bytes 0 --quant-algo gptq",
        "ql4-gptq=--method quant-lowrank --bits 4 --lowrank-bytes 0.02 --quant-algo gptq",
        # the like-for-like decode-speed point: ORT's w4 also quantizes the (tied) LM head's MatMul
        "w4+head=--method quant-lowrank --bits 4 --lowrank-bytes 0 --quantize-head --embedding-bits 4",
        "w4-gptq+emb4=--method quant-lowrank --bits 4 --lowrank-bytes 0 --quant-algo gptq --quantize-head --embedding-bits 4",
    ],
}
# decoders: these rows' files are kept and raced for decode speed in one interleaved loop (run-to-run noise on
# a shared 2-core CPU is +-10%, larger than the differences between rows measured at different times)
RACE = {"smollm2": ("ort-w4", "ort-w4+gather", "ort-w8", "w4+head", "w4-gptq+emb4", "w8+emb4", "ql4-gptq+emb4")}


def file_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def original_onnx(session, work: Path) -> Path:
    """The original model as the project exports it, folded by the ORT pass list (initializer weights)."""
    import onnx
    import onnxruntime as ort

    from factordeploy.export import export_onnx
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline

    path = work / "original.onnx"
    if not path.exists():
        raw = work / "raw.onnx"
        export_onnx(session.loaded, session.loaded.model, raw)
        proto = run_pipeline(onnx.load(str(raw)), ort_pipeline(), PassContext(layers={}, target="ort"))
        passed = work / "passed.onnx"
        onnx.save_model(proto, str(passed))
        # the pass list folds constants up to 1 MiB; ORT's basic level folds the rest (Transpose(W) of the
        # large linears), so every linear is MatMul(x, initializer): what MatMulNBitsQuantizer needs
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(path)
        ort.InferenceSession(str(passed), so, providers=["CPUExecutionProvider"])
        raw.unlink()
        passed.unlink()
    return path


def ort_anchor(original: Path, name: str, work: Path) -> Path:
    """ONNX Runtime's own quantizer on the original file: the one line a user runs instead of this project."""
    from factordeploy.engines.quantize import ort_weight_only, quantize_int8

    path = work / f"{name}.onnx"
    if path.exists():
        return path
    if name == "ort-int8":
        quantize_int8(original, path)
        return path
    bits = 8 if name == "ort-w8" else 4
    ort_weight_only(original, path, bits, 32, ("MatMul", "Gather") if name.endswith("+gather") else ("MatMul",))
    return path


def project_point(model: str, flags: str, calib: int, out: Path) -> tuple[Path, dict]:
    """One real `deploy build` (ORT backend, no in-build evaluation: the benchmark scores every file alike)."""
    from click.testing import CliRunner

    from factordeploy.cli import main

    args = ["build", "--model", model, "--calib", str(calib), "--backend", "ort", "--no-eval", "--no-baseline",
            "--out", str(out), "--overwrite", "--quiet"] + shlex.split(flags)
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    dt = time.perf_counter() - t0
    if r.exit_code != 0:
        raise SystemExit(f"build failed ({' '.join(args)}):\n{r.output}")
    rep = json.loads((out / "report.json").read_text())
    q = rep.get("quantize") or {}
    info = {"build_s": round(dt, 1), "targeted_bytes_ratio": round(1 - rep["size"]["targeted_reduction"], 4),
            "check_max_abs": rep["fidelity"]["max_abs"], "check_passed": rep["fidelity"]["passed"],
            "deployed_check": q.get("fidelity", {}).get("passed")}
    extra = rep["method"].get("extra") or {}
    if "plan" in extra:  # --method auto: the forms chosen, and the held-out check between plans
        info["auto"] = {k: extra.get(k) for k in ("plan", "forms", "held_out", "chosen_bytes", "budget_bytes")}
    return out / "model.onnx", info


def score(session, path: Path, cache: dict) -> dict:
    from factordeploy.engines.ort_model import OrtModel
    from factordeploy.verify.domains import DomainSample, decoder_agreement, encoder_agreement

    loaded, test, out = session.loaded, OrtModel(path, threads=1), {}
    for d in DOMAINS:
        if loaded.kind == "encoder":
            r, cache[d] = encoder_agreement(loaded, loaded.model, test, DomainSample(d, sentences=128), cache.get(d))
            out[d] = r["cosine_mean"]
        else:
            r = decoder_agreement(loaded, loaded.model, test, DomainSample(d, windows=4, window_len=256), cache.get(d))
            cache[d] = r["perplexity_original"]
            out[d] = r["perplexity_ratio"]
    return out


def decode_prompt(session) -> list[int]:
    """The 64-token prompt every decode timing starts from (the first evaluation article)."""
    from factordeploy.models.text import evaluation_articles

    return session.loaded.token_ids(evaluation_articles()[:1])[:64]


def decode_speed(session, path: Path, threads: int, new_tokens: int = 64) -> float:
    from factordeploy.serve.generate import SamplingConfig, generate_ids
    from factordeploy.serve.runners import OrtStepRunner

    runner = OrtStepRunner(path, threads=threads)
    prompt = decode_prompt(session)
    generate_ids(runner, prompt, SamplingConfig(max_new_tokens=4, ignore_eos=True))
    runs = [generate_ids(runner, prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)) for _ in range(2)]
    return round(max(g.decode_tokens_per_s for g in runs), 2)


def decode_race(session, paths: dict[str, Path], threads: int, rounds: int = 5, new_tokens: int = 64) -> dict[str, dict]:
    """Decode tokens/s of several files in ONE loop: round r runs every file once (order rotated each round),
    so a neighbour's load on the shared CPU hits all files alike; median and spread over the rounds."""
    import statistics

    from factordeploy.serve.generate import SamplingConfig, generate_ids
    from factordeploy.serve.runners import OrtStepRunner

    prompt = decode_prompt(session)
    runners = {n: OrtStepRunner(p, threads=threads) for n, p in paths.items()}
    for r in runners.values():  # warm-up: first-run allocations out of the measurement
        generate_ids(r, prompt, SamplingConfig(max_new_tokens=4, ignore_eos=True))
    speeds: dict[str, list[float]] = {n: [] for n in runners}
    cpu: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for k in range(rounds):
        for n in names[k % len(names):] + names[:k % len(names)]:
            c0 = time.process_time()
            g = generate_ids(runners[n], prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True))
            cpu[n].append(time.process_time() - c0)
            speeds[n].append(g.decode_tokens_per_s)
    # CPU seconds of this process per generate (prompt + new tokens, one thread): what the file costs to run,
    # free of the wall-clock stalls other tenants of a shared machine cause
    return {n: {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2),
                "cpu_ms": round(1e3 * statistics.median(cpu[n]), 1), "rounds": rounds} for n, v in speeds.items()}


def render_race(race: dict[str, dict], rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    ref = race.get("ort-w4", {}).get("median")
    lines = ["Decode tokens/s, batch 1, one thread, every file in the same interleaved loop (median over rounds; "
             "min-max in brackets); CPU ms: this process's CPU time per generate (64-token prompt + 64 new tokens, "
             "median), immune to other tenants' stalls.", "",
             "| artifact | MB on disk | decode tok/s | vs ort-w4 | CPU ms per generate | CPU vs ort-w4 |",
             "|---|---:|---:|---:|---:|---:|"]
    ref_cpu = race.get("ort-w4", {}).get("cpu_ms")
    for n, v in sorted(race.items(), key=lambda kv: by[kv[0]]["file_bytes"] if kv[0] in by else 0):
        mb = by[n]["file_bytes"] / 1e6 if n in by else float("nan")
        rel = f"{v['median'] / ref:.2f}x" if ref else "-"
        cpu = v.get("cpu_ms")
        crel = f"{ref_cpu / cpu:.2f}x faster" if ref_cpu and cpu else "-"
        lines.append(f"| {n} | {mb:.1f} | {v['median']:.1f} ({v['min']:.1f}-{v['max']:.1f}) | {rel} | "
                     f"{cpu if cpu else '-'} | {crel} |")
    return "\n".join(lines)


def worst(row: dict, encoder: bool) -> float:
    vals = [row["quality"][d] for d in DOMAINS]
    return min(vals) if encoder else max(vals)


def render(rows: list[dict], encoder: bool) -> str:
    w4 = next((r for r in rows if r["name"] == "ort-w4"), None)
    metric = "mean embedding cosine" if encoder else "perplexity ratio"
    lines = [f"Quality: {metric} of the ORT file vs the original fp32 model; wiki in domain, news and pydoc never "
             "calibrated on. `vs ort-w4`: file bytes ratio and worst-domain quality difference (+ = better).", "",
             "| artifact | MB on disk | bytes vs ort-w4 | wiki | news | pydoc | worst | better than ort-w4 on both axes |"
             + (" decode tok/s |" if not encoder else "") + " build s |",
             "|---|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if not encoder else "") + "---:|"]
    for r in sorted(rows, key=lambda r: r["file_bytes"]):
        q = r["quality"]
        wq = worst(r, encoder)
        both = "-"
        if w4 is not None and r is not w4:
            ww = worst(w4, encoder)
            gain = (wq - ww) if encoder else (ww - wq)
            both = ("**yes**" if r["file_bytes"] <= w4["file_bytes"] and gain > 0 else "no") + f" ({gain:+.4f})"
        br = f"{r['file_bytes'] / w4['file_bytes']:.3f}" if w4 else "-"
        lines.append(f"| {r['name']} | {r['file_bytes'] / 1e6:.1f} | {br} | " + " | ".join(f"{q[d]:.4f}" for d in DOMAINS)
                     + f" | {wq:.4f} | {both} |" + (f" {r.get('decode_tokens_per_s', float('nan')):.1f} |" if not encoder else "")
                     + f" {r.get('build_s', '-')} |")
    return "\n".join(lines)


def plot(rows: list[dict], encoder: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [("file_bytes", "MB on disk", 1e6)] + ([] if encoder else [("decode_tokens_per_s", "decode tokens/s (1 thread)", 1)])
    fig, axs = plt.subplots(1, len(axes), figsize=(7 * len(axes), 5), squeeze=False)
    for ax, (key, label, div) in zip(axs[0], axes):
        for r in rows:
            if key not in r:
                continue
            anchor = r["name"] in ANCHORS
            ax.scatter(r[key] / div, worst(r, encoder), marker="s" if anchor else "o",
                       color="tab:red" if anchor else "tab:blue", zorder=3)
            ax.annotate(r["name"], (r[key] / div, worst(r, encoder)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("worst-domain " + ("embedding cosine" if encoder else "perplexity ratio (lower is better)"))
        ax.grid(alpha=0.3)
    fig.suptitle("red squares: ONNX Runtime's quantizer on the original; blue: factordeploy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--points", default=None, help="preset name (minilm, smollm2) or ';'-separated name=flags [default: the model's preset]")
@click.option("--anchors", default=",".join(ANCHORS), show_default=True)
@click.option("--calib", type=int, default=32, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--out", default=None, help="JSON path [default: benchmarks/results/quant-frontier-<model>.json]")
@click.option("--race", default=None, help="comma-separated rows raced for decode speed in one loop [default: the model's preset]")
@click.option("--race-rounds", type=int, default=5, show_default=True)
def main(model, points, anchors, calib, threads, out, race, race_rounds):
    from factordeploy.compress.calibration import CalibrationConfig
    from factordeploy.pipeline import open_session
    from factordeploy.progress import log

    preset = POINTS.get(points or Path(model).name, None)
    specs = preset if preset is not None else [p for p in (points or "").split(";") if p.strip()]
    out_path = Path(out or f"benchmarks/results/quant-frontier-{Path(model).name}.json")
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    done = {r["name"] for r in doc["rows"]}
    session = open_session(model, CalibrationConfig(n=calib, length=128, seed=0), evaluate=False)
    encoder = session.loaded.kind == "encoder"
    work = Path("build/quant_frontier") / Path(model).name
    work.mkdir(parents=True, exist_ok=True)
    cache: dict = {}

    racers = [n for n in (race.split(",") if race is not None else RACE.get(Path(model).name, ())) if n]

    def save_doc() -> None:
        doc["setup"] = {"model": model, "calib": calib, "threads": threads, "domains": DOMAINS,
                        "metric": "embedding cosine (mean)" if encoder else "perplexity ratio"}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, out_path)

    def save(row: dict) -> None:
        doc["rows"] = [x for x in doc["rows"] if x["name"] != row["name"]] + [row]
        save_doc()
        log(f"{row['name']}: {row['file_bytes'] / 1e6:.1f} MB, {row['quality']}")

    def finish(name: str, path: Path, info: dict) -> None:
        row = {"name": name, **info, "file_bytes": file_bytes(path), "quality": score(session, path, cache)}
        if not encoder:
            row["decode_tokens_per_s"] = decode_speed(session, path, threads)
        save(row)

    original = original_onnx(session, work)
    for a in [a for a in anchors.split(",") if a]:
        if a not in done:
            t0 = time.perf_counter()
            p = original if a == "original" else ort_anchor(original, a, work)
            finish(a, p, {"flags": "ORT quantizer" if a != "original" else "fp32", "build_s": round(time.perf_counter() - t0, 1)})
    for spec in specs:
        name, _, flags = spec.partition("=")
        if name.strip() in done:
            continue
        folder = work / name.strip().replace("+", "_")
        path, info = project_point(model, flags, calib, folder)
        finish(name.strip(), path, {"flags": flags.strip(), **info})
        if name.strip() not in racers:
            shutil.rmtree(folder, ignore_errors=True)
    table = render(doc["rows"], encoder)
    if not encoder and racers:
        paths = {n: (original if n == "original" else work / f"{n}.onnx") if n in ANCHORS
                 else work / n.replace("+", "_") / "model.onnx" for n in racers}
        missing = [n for n, p in paths.items() if not p.exists()]
        if missing:  # a point scored by an earlier run whose file was not kept: build it again for the race
            log(f"race: rebuilding {missing} (files not kept by the run that scored them)")
            for spec in specs:
                name, _, flags = spec.partition("=")
                if name.strip() in missing:
                    project_point(model, flags, calib, paths[name.strip()].parent)
        doc["race"] = decode_race(session, {n: p for n, p in paths.items() if p.exists()}, threads, race_rounds)
        save_doc()
        table += "\n\n" + render_race(doc["race"], doc["rows"])
    print(table)
    out_path.with_suffix(".md").write_text(table + "\n")
    plot(doc["rows"], encoder, out_path.with_suffix(".png"))


if __name__ == "__main__":
    main()
