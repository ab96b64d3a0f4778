"""Decode speed with the KV cache on ONNX Runtime CPU: original vs each method x ratio (x int8).

For every cell: compress a copy of the model (calibration shared between cells), export it with
the with-past signature, run the ORT pass pipeline (optionally --quantize int8), then with
`deploy generate`'s loop (serve/generate.py) measure at batch 1:

* prefill latency of a --prompt-len prompt (median of --prefill-runs),
* tokens/s for --new-tokens greedy tokens (prefill included, as Optimum's figure is stated) and
  the cached-step rate alone,
* greedy token identity against the torch compressed model's `generate` on 5 prompts
  (--check-tokens new tokens each),
* quality of the artifact itself (ORT, so int8 included) against the original fp32 torch model:
  perplexity ratio and next-token top-1 agreement on held-out wiki (in domain) and news (out of domain,
  never calibrated on) windows (--quality-windows x 256 tokens, verify.domains),

next to the artifact's bytes. Decode is memory-bound, so `bytes ratio` (original file / cell file)
is the speedup to expect; `speedup` is the measured one. Resumable: finished cells are kept in the
JSON and skipped. The full grid is one command:

    /work/locks/slot env PYTHONPATH=. python benchmarks/decode_speed.py --model smollm2 \\
        --methods original,svd,svd-whiten,fwsvd,welore,cospadi,sparse24,dsformer \\
        --ratios 0.2,0.35,0.5 --quantize none,int8 --calib 32

(about 3.5 min per (method, ratio) group for fp32 + int8 on one core, plus the compression: cospadi ~4-6 min.)

(`sparse24` has a fixed 2:4 pattern: it runs once, whatever --ratios says.)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUALITY_DOMAINS = ("wiki", "news")  # in domain (held-out split) and out of domain (never calibrated on)
CHECK_PROMPTS = ["The history of the city begins", "In 1990, the company announced",
                 "The main difference between a virus and a bacterium is", "def fibonacci(n):",
                 "She opened the door and saw"]


def cell_key(method: str, ratio: float | None, quant: str) -> str:
    return f"{method}|{ratio if ratio is not None else '-'}|{quant}"


def build_cell(session, method: str, ratio: float | None, work: Path):
    """Compressed (or original) model -> fp32 with-past ONNX for ORT. Returns (torch model, path, info)."""
    import onnx

    from factordeploy.export import export_onnx
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline
    from factordeploy.pipeline import compress_copy

    info: dict = {}
    if method == "original":
        model, layers = session.loaded.model, {}
    else:
        model, result, dt = compress_copy(session, method, ratio)
        layers = {r.name: r.after for r in result.layers if r.after.get("kind") != "dense"}
        info |= {"compress_s": round(dt, 1), "targeted_reduction": round(1 - result.bytes_after / result.bytes_before, 4)}
    t0 = time.perf_counter()
    raw = work / "raw.onnx"
    export_onnx(session.loaded, model, raw)
    path = work / "model.onnx"
    proto = run_pipeline(onnx.load(str(raw)), ort_pipeline(), PassContext(layers=layers, target="ort"))
    onnx.save_model(proto, str(path))
    raw.unlink()
    info["export_s"] = round(time.perf_counter() - t0, 1)
    return model, path, info


def quantize_cell(path: Path) -> tuple[Path, dict]:
    """int8 (dynamic, per channel) of the cell's fp32 file: the same compressed weights, quantized."""
    from factordeploy.engines.quantize import quantize_int8

    t0 = time.perf_counter()
    q = quantize_int8(path, path.with_name("model.int8.onnx"))
    return Path(q.path), {"int8_matmuls": f"{q.matmuls_quantized}/{q.matmuls_total}",
                          "quantize_s": round(time.perf_counter() - t0, 1)}


def quality(session, path: Path, windows: int, cache: dict) -> dict:
    """Perplexity ratio and top-1 agreement of the ORT artifact vs the original fp32 torch model, per domain."""
    from factordeploy.engines.ort_model import OrtModel
    from factordeploy.verify.domains import DomainSample, decoder_agreement

    test, out = OrtModel(path, threads=1), {}
    for domain in QUALITY_DOMAINS:
        s = DomainSample(domain=domain, windows=windows, window_len=256)
        r = decoder_agreement(session.loaded, session.loaded.model, test, s, reference_ppl=cache.get(domain))
        cache[domain] = r["perplexity_original"]
        out[domain] = {k: r[k] for k in ("perplexity", "perplexity_original", "perplexity_ratio", "top1_agreement")}
    return {"quality": out, "quality_windows": f"{windows} x 256"}


def measure(session, model, path: Path, args) -> dict:
    import torch

    from factordeploy.models.text import evaluation_articles
    from factordeploy.serve.generate import SamplingConfig, generate_ids
    from factordeploy.serve.runners import OrtStepRunner

    loaded = session.loaded
    runner = OrtStepRunner(path, threads=args.threads)
    prompt = loaded.token_ids(evaluation_articles()[:1])[: args.prompt_len]
    generate_ids(runner, prompt, SamplingConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    prefill = [generate_ids(runner, prompt, SamplingConfig(max_new_tokens=1, ignore_eos=True)).prefill_s
               for _ in range(args.prefill_runs)]
    runs = [generate_ids(runner, prompt, SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True))
            for _ in range(args.repeats)]
    best = max(runs, key=lambda g: g.tokens_per_s)
    data = Path(str(path) + ".data")  # external weights, where the file has them
    row = {"file_bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0), "prefill_ms": round(statistics.median(prefill) * 1e3, 2),
           "tokens_per_s": round(best.tokens_per_s, 2), "decode_tokens_per_s": round(best.decode_tokens_per_s, 2),
           "step_ms_median": round(statistics.median(best.step_s) * 1e3, 2)}
    if args.check_steps:  # the build's export check on this artifact: torch (fp32) vs ORT, prefill + decode steps
        from factordeploy.verify.fidelity import check_plan, compare_torch_onnx

        plan = check_plan(loaded, model, decode_steps=args.check_steps)
        fid = compare_torch_onnx(plan.fn, str(path), plan.feeds, plan.input_names, plan.output_names, atol=0.5, rtol=0.0,
                                 error_stat="mean")
        row |= {"check_max_abs": round(fid.max_abs, 5), "check_mean_abs": round(fid.mean_abs, 6)}
    if args.check_tokens:
        same = 0
        tok = loaded.tokenizer
        for p in CHECK_PROMPTS:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=args.check_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            got = generate_ids(runner, ids, SamplingConfig(max_new_tokens=args.check_tokens, ignore_eos=True)).new_ids
            same += int(got == ref)
            row.setdefault("check_first_mismatch", []).append(
                next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None))
        row["greedy_identical"] = f"{same}/{len(CHECK_PROMPTS)}"
    if args.quality_windows:
        row |= quality(session, path, args.quality_windows, args.ppl_cache)
    return row


def _quality(row: dict, key: str) -> str:
    q = row.get("quality")
    return " / ".join(f"{q[d][key]:.3f}" for d in QUALITY_DOMAINS) if q else "-"


def render(rows: list[dict], threads: int) -> str:
    """Speedup and bytes ratio against the original fp32 file, and against the original with the same weights
    (int8 rows vs the original int8: what factorization adds on top of int8 alone)."""
    orig = {r["quantize"]: r for r in rows if r["method"] == "original"}
    nan = float("nan")

    def ratios(r: dict, base: dict | None) -> tuple[float, float]:
        if not base:
            return nan, nan
        return base["file_bytes"] / r["file_bytes"], r["tokens_per_s"] / base["tokens_per_s"]

    lines = [f"ONNX Runtime CPU, batch 1, {threads} thread(s); tokens/s over prompt + all new tokens; "
             "bytes ratio = original file / this file, speedup = this tokens/s / original tokens/s; "
             "ppl ratio and top-1 agreement: the ORT artifact vs the original fp32 torch model", "",
             "| method | ratio | weights | MB | bytes ratio vs fp32 orig | speedup vs fp32 orig | bytes ratio vs same-weights orig "
             "| speedup vs same-weights orig | prefill ms | tokens/s | cached steps tok/s | ppl ratio wiki / news | top-1 agree wiki / news "
             "| greedy = torch | check mean / max abs |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        br, sp = ratios(r, orig.get("none"))
        br_q, sp_q = ratios(r, orig.get(r["quantize"]))
        lines.append(f"| {r['method']} | {r['ratio'] if r['ratio'] is not None else '-'} | {'int8' if r['quantize'] == 'int8' else 'fp32'} | "
                     f"{r['file_bytes'] / 1e6:.1f} | {br:.2f}x | {sp:.2f}x | {br_q:.2f}x | {sp_q:.2f}x | {r['prefill_ms']:.0f} | "
                     f"{r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {_quality(r, 'perplexity_ratio')} | "
                     f"{_quality(r, 'top1_agreement')} | {r.get('greedy_identical', '-')} | "
                     f"{r.get('check_mean_abs', nan):.2g} / {r.get('check_max_abs', nan):.2g} |")
    return "\n".join(lines)


@click.command()
@click.option("--model", default="smollm2", show_default=True)
@click.option("--methods", default="original,svd,svd-whiten,fwsvd,welore,cospadi,sparse24,dsformer", show_default=True)
@click.option("--ratios", default="0.2,0.35,0.5", show_default=True)
@click.option("--quantize", "quants", default="none", show_default=True, help="none,int8")
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True)
@click.option("--prefill-runs", type=int, default=5, show_default=True)
@click.option("--check-tokens", type=int, default=16, show_default=True, help="greedy identity check length (0 = off)")
@click.option("--check-steps", type=int, default=3, show_default=True, help="decode steps of the torch-vs-ORT check (0 = off)")
@click.option("--quality-windows", type=int, default=4, show_default=True,
              help="256-token windows per domain (wiki, news) for the artifact's perplexity vs the original (0 = off)")
@click.option("--threads", type=int, default=1, show_default=True, help="ORT intra-op threads (original measured alike)")
@click.option("--calib", type=int, default=128, show_default=True)
@click.option("--max-cells", type=int, default=0,
              help="stop after this many new (method, ratio) groups, each with all its --quantize cells (rerun resumes)")
@click.option("--out", default=None, help="JSON path [default: benchmarks/results/decode_speed-<model>.json]")
def main(model, methods, ratios, quants, prompt_len, new_tokens, repeats, prefill_runs, check_tokens, check_steps,
         quality_windows, threads, calib, max_cells, out):
    from factordeploy.compress.calibration import CalibrationConfig
    from factordeploy.pipeline import open_session
    from factordeploy.progress import log

    out_path = Path(out or f"benchmarks/results/decode_speed-{model}.json")
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    done = {cell_key(r["method"], r["ratio"], r["quantize"]) for r in doc["rows"]}
    args = click.get_current_context().params | {"threads": threads, "ppl_cache": {}}
    args = type("Args", (), args)
    groups: dict[tuple[str, float | None], list[str]] = {}  # (method, ratio) -> quantizations still to run
    for m in methods.split(","):
        for r in ([None] if m in ("original", "sparse24") else [float(x) for x in ratios.split(",")]):
            todo = [q for q in quants.split(",") if cell_key(m, r, q) not in done]
            if todo:
                groups[(m, r)] = todo
    if max_cells:  # whole (method, ratio) groups: their fp32 and int8 cells share one compression and export
        groups = dict(list(groups.items())[:max_cells])
    session = open_session(model, CalibrationConfig(n=calib, length=128, seed=0), evaluate=False)
    work = Path("build/decode_speed") / Path(model).name  # never the model folder itself (absolute paths)

    def save(row: dict) -> None:
        key = cell_key(row["method"], row["ratio"], row["quantize"])
        doc["rows"] = [x for x in doc["rows"] if cell_key(x["method"], x["ratio"], x["quantize"]) != key]
        doc["rows"].append(row)
        doc["setup"] = {"model": model, "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": threads,
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": repeats, "batch": 1,
                        "calib": calib}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, out_path)
        log(f"cell {key}: {row['tokens_per_s']} tokens/s, {row['file_bytes'] / 1e6:.1f} MB")

    for (m, r), todo in groups.items():
        log(f"cells {m} {r} {'+'.join(todo)}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        torch_model, path, info = build_cell(session, m, 0.5 if r is None and m != "original" else r, work)
        for q in todo:
            t1 = time.perf_counter()
            qpath, qinfo = (path, {}) if q == "none" else quantize_cell(path)
            save({"method": m, "ratio": r, "quantize": q, **measure(session, torch_model, qpath, args), **info, **qinfo,
                  "cell_s": round(time.perf_counter() - (t0 if q == todo[0] else t1), 1),
                  "loadavg_1m": round(os.getloadavg()[0], 2)})
        del torch_model
    shutil.rmtree(work, ignore_errors=True)
    order = {m: i for i, m in enumerate(methods.split(","))}
    rows = sorted(doc["rows"], key=lambda x: (x["quantize"] != "none", order.get(x["method"], 99), x["ratio"] or 0))
    table = render(rows, threads)
    print(table)
    out_path.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
