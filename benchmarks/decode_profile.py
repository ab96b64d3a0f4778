"""Where a decode step's time goes, per operator type, for several KV-cache model.onnx files side by side.

Decode races between artifacts differ by a few percent, below this machine's run-to-run noise; ONNX
Runtime's own profiler says which operators make the difference (kernel time per generated token, summed
by op type), so a speed claim can name its cause instead of a noisy median.

    python benchmarks/decode_profile.py --model smollm2 \
        --files ort-w4=build/quant_frontier/smollm2/ort-w4.onnx,auto=build/.../model.onnx

Prints a table (us per token by op type, the kernel total, the wall time per token) and writes JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import click


def profile_decode(path: Path, prompt: list[int], threads: int, new_tokens: int) -> dict:
    """Kernel microseconds per generated token by op type (prefill excluded), and wall ms per token."""
    import onnxruntime as ort

    from factordeploy.serve.generate import SamplingConfig, generate_ids
    from factordeploy.serve.runners import OrtStepRunner

    runner = OrtStepRunner(path, threads=threads)
    generate_ids(runner, prompt, SamplingConfig(max_new_tokens=4, ignore_eos=True))  # warm-up, not profiled
    t0 = time.perf_counter()
    g = generate_ids(runner, prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        runner.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        generate_ids(runner, prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True))
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prompt (prefill)
    start = decode_runs[0]["ts"] if decode_runs else 0
    by_op: dict[str, float] = defaultdict(float)
    nodes = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
            nodes += 1
    steps = max(len(decode_runs), 1)
    return {"us_per_token": {k: round(v / steps, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "kernel_us_per_token": round(sum(by_op.values()) / steps, 1),
            "run_us_per_token": round(sum(r["dur"] for r in decode_runs) / steps, 1),
            "nodes_per_token": round(nodes / steps), "decode_tokens_per_s": round(g.decode_tokens_per_s, 2),
            "wall_s": round(wall, 3)}


def render(results: dict[str, dict], top: int) -> str:
    names = list(results)
    ops: dict[str, float] = defaultdict(float)
    for r in results.values():
        for k, v in r["us_per_token"].items():
            ops[k] = max(ops[k], v)
    keep = [k for k, _ in sorted(ops.items(), key=lambda kv: -kv[1])[:top]]
    lines = ["Decode step, us per generated token (ONNX Runtime profiler, kernel time by op type; one thread)", "",
             "| op type | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in keep:
        lines.append(f"| {k} | " + " | ".join(f"{results[n]['us_per_token'].get(k, 0.0):.0f}" for n in names) + " |")
    for label, key in (("kernels, all ops", "kernel_us_per_token"), ("session run (kernels + overhead)", "run_us_per_token"),
                       ("nodes run per token", "nodes_per_token"), ("decode tok/s (unprofiled run)", "decode_tokens_per_s")):
        lines.append(f"| **{label}** | " + " | ".join(f"{results[n][key]:.1f}" if isinstance(results[n][key], float)
                                                     else str(results[n][key]) for n in names) + " |")
    return "\n".join(lines)


@click.command()
@click.option("--model", default="smollm2", show_default=True, help="the model whose tokenizer makes the prompt")
@click.option("--files", required=True, help="comma-separated name=path/to/model.onnx")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--top", type=int, default=12, show_default=True, help="op types shown (by largest time)")
@click.option("--out", default="benchmarks/results/decode_profile.json", show_default=True)
def main(model, files, threads, new_tokens, top, out):
    from factordeploy.models.registry import load_model
    from factordeploy.models.text import evaluation_articles

    loaded = load_model(model)
    prompt = loaded.token_ids(evaluation_articles()[:1])[:64]
    paths = dict(f.split("=", 1) for f in files.split(",") if f)
    results = {n: profile_decode(Path(p), prompt, threads, new_tokens) for n, p in paths.items()}
    table = render(results, top)
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"setup": {"model": model, "files": paths, "threads": threads,
                                               "new_tokens": new_tokens}, "results": results}, indent=2))
    Path(out).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
