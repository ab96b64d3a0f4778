"""ONNX Runtime CPU latency and peak memory: full attention vs Combiner patterns, one SmolLM2 attention layer
and the whole SmolLM2 forward, over sequence lengths; the crossover length and each variant's growth exponent.

    /work/locks/slot env PYTHONPATH=. python benchmarks/combiner_latency.py \
        --layer-lengths 512,1024,2048,4096,8192 --model-lengths 512,1024,2048,4096,8192

Each (scope, variant) is exported once with a dynamic length (CombinerAttention lowered as `deploy build`
does for ONNX Runtime; --export-dir keeps the exports for reruns) and run in a fresh process. Peak memory
of a length: the peak resident set during its runs (VmHWM, reset before them) minus the resident set just
before, with ORT's memory arena off, i.e. the working memory of one forward at L beyond the loaded
weights. Batch 1, one intra-op thread. Latency: median of --runs after one warm-up (--warmup-below: the
long lengths skip the warm-up). Exponent: least-squares slope of log(latency) on log(L) (all lengths, and the three longest, where the
asymptotic term dominates). Each measured length is written to benchmarks/results/combiner_latency.json at
once; a rerun with the same --block skips finished (scope, variant, L) cells, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("full", "combiner-fixed", "combiner-logsparse", "combiner-axial")
OUT = Path(__file__).resolve().parent / "results" / "combiner_latency.json"


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _export(scope: str, variant: str, block: int, max_len: int, path: Path) -> None:
    import torch

    from factordeploy.attention import AttentionConfig, install_combiner
    from factordeploy.export import export_onnx
    from factordeploy.models.registry import load_model

    lm = load_model("smollm2")
    if variant != "full":
        install_combiner(lm.model, AttentionConfig(kind=variant, block=block, max_len=max_len))
    if scope == "model":
        # Full-sequence forward (input_ids, attention_mask -> logits) for every variant, as Combiner builds export.
        export_onnx(lm, lm.model, path, batch=1, seq=max_len, with_past=False)
        _lower(path)
        return

    class Layer(torch.nn.Module):
        """Layer 0's attention (q/k/v/o projections, RoPE, attention core) on hidden states."""

        def __init__(self) -> None:
            super().__init__()
            self.rot, self.attn = lm.model.model.rotary_emb, lm.model.model.layers[0].self_attn

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            return self.attn(h, self.rot(h, pos), attention_mask=None)[0]

    h = torch.randn(1, max_len, lm.model.config.hidden_size)
    dim = torch.export.Dim("sequence", min=2, max=max_len)
    with torch.no_grad():
        torch.onnx.export(Layer().eval(), (h,), str(path), dynamo=True, input_names=["hidden"], output_names=["out"],
                          dynamic_shapes={"h": {1: dim}}, opset_version=18, optimize=False, verbose=False)
    _lower(path)


def _lower(path: Path) -> None:
    """The ORT artifact as `deploy build` makes it: CombinerAttention nodes lowered to their standard-op body."""
    import onnx

    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline

    onnx.save(run_pipeline(onnx.load(str(path)), ort_pipeline(), PassContext(layers={}, target="ort")), str(path))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def worker(scope: str, path: Path, lengths: list[int], runs: int, warmup_below: int, arena: bool = False) -> None:
    """Runs an exported artifact in a fresh process (so the export's memory is not in the peak).

    Peak memory of a length = the process's peak resident set during that length's runs (VmHWM, reset
    through /proc/self/clear_refs before them) minus its resident set just before: the working memory
    one forward at L needs beyond the loaded session. ORT's CPU memory arena is off so each run frees
    what it allocated and no length inherits a larger one's arena. `arena`: time a second session with
    the arena on (ORT's default: after the warm-up no run pays for fresh pages); the memory stays the
    arena-off session's single run."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    timed = sess
    if arena:
        so_on = ort.SessionOptions()
        so_on.intra_op_num_threads, so_on.log_severity_level = 1, 3
        timed = ort.InferenceSession(str(path), so_on, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    seen: list[tuple[int, float]] = []
    for L in lengths:
        if seen:  # do not push the shared machine into the OOM killer: predict the peak from the last growth
            (l0, m0), (l1, m1) = seen[-2] if len(seen) > 1 else (seen[-1][0] / 2, seen[-1][1] / 4), seen[-1]
            growth = min(2.0, max(1.0, math.log(max(m1, 1.0) / max(m0, 1.0)) / math.log(l1 / l0)))
            need, avail = m1 * (L / l1) ** growth, _available_mb() - 2048
            if need > avail:
                print(json.dumps({"L": L, "skipped": f"predicted peak {need:.0f} MB > {avail:.0f} MB available"}),
                      flush=True)
                return
        if scope == "model":
            ids = rng.integers(100, 40000, size=(1, L), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        else:
            feeds = {"hidden": rng.standard_normal((1, L, 576)).astype(np.float32)}
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = _status_mb("VmRSS")
        if arena:
            sess.run(None, feeds)
            peak = _status_mb("VmHWM") - base
        if L < warmup_below:
            timed.run(None, feeds)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            timed.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        if not arena:
            peak = _status_mb("VmHWM") - base
        seen.append((L, max(peak, 1.0)))
        print(json.dumps({"L": L, "median_ms": round(times[len(times) // 2], 2), "runs": runs,
                          "warmup": L < warmup_below, "arena": arena, "peak_mb": round(peak, 1)}), flush=True)


def fit_exponent(rows: list[dict], key: str = "median_ms") -> float | None:
    pts = [(math.log(r["L"]), math.log(max(r[key], 1e-3))) for r in rows]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 2)


def _load(out: Path, block: int) -> list[dict]:
    """Rows already measured with the same block (the script resumes: finished cells are skipped)."""
    if not out.exists():
        return []
    d = json.loads(out.read_text())
    return d["rows"] if d.get("block") == block else []


def _summary(rows: list[dict]) -> list[dict]:
    """Exponents and crossover of every variant measured so far (not only this run's --variants)."""
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    summary = []
    for scope in ("layer", "model"):
        full = {r["L"]: r for r in rows if r["scope"] == scope and r["variant"] == "full"}
        for v in variants:
            rs = sorted((r for r in rows if r["scope"] == scope and r["variant"] == v), key=lambda r: r["L"])
            if not rs:
                continue
            faster = [r["L"] for r in rs if r["L"] in full and r["median_ms"] < full[r["L"]]["median_ms"]]
            summary.append({"scope": scope, "variant": v, "exponent": fit_exponent(rs),
                            "exponent_top3": fit_exponent(rs[-3:]) if len(rs) >= 3 else None,
                            "memory_exponent": fit_exponent(rs[-3:], "peak_mb") if len(rs) >= 3 else None,
                            "first_L_faster_than_full": faster[0] if faster and v != "full" else None})
    return summary


def _save(out: Path, a: argparse.Namespace, rows: list[dict]) -> list[dict]:
    summary = _summary(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"block": a.block, "threads": 1, "batch": 1, "rows": rows, "summary": summary,
                               "command": " ".join(sys.argv)}, indent=1))
    os.replace(tmp, out)
    return summary


def render(rows: list[dict]) -> str:
    """Markdown: per scope, latency (ms) and peak working memory (MB) per L, exponents, crossover."""
    lines = []
    for scope in ("layer", "model"):
        mine = [r for r in rows if r["scope"] == scope]
        if not mine:
            continue
        Ls = sorted({r["L"] for r in mine})
        full = {r["L"]: r for r in mine if r["variant"] == "full"}
        lines += ["", f"**{'one SmolLM2 attention layer' if scope == 'layer' else 'whole SmolLM2 forward'}**: "
                  "median ms / peak working MB (speed-up vs full)", "",
                  "| attention | " + " | ".join(f"L={L}" for L in Ls) + " | time exponent (all / 3 longest) "
                  "| memory exponent (3 longest) | first L faster than full |",
                  "|---|" + "---:|" * (len(Ls) + 3)]
        for s in _summary(rows):
            if s["scope"] != scope:
                continue
            cells = {r["L"]: r for r in mine if r["variant"] == s["variant"]}
            out = []
            for L in Ls:
                if L not in cells:
                    out.append("-")
                    continue
                c = cells[L]
                x = f" ({full[L]['median_ms'] / c['median_ms']:.1f}x)" if L in full and s["variant"] != "full" else ""
                out.append(f"{c['median_ms']:.1f} / {c['peak_mb']:.0f}{x}")
            lines.append(f"| {s['variant']} | " + " | ".join(out) + f" | {s['exponent']} / {s['exponent_top3']} | "
                         f"{s['memory_exponent']} | {s['first_L_faster_than_full'] or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer-lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--model-lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--block", type=int, default=64, help="Combiner block (64 ~ sqrt(4096))")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model-runs", type=int, default=1)
    ap.add_argument("--warmup-below", type=int, default=1 << 30,
                    help="lengths >= this skip the warm-up run (saves one forward at long lengths)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--export-dir", default="", help="keep the exported models here and reuse them on a rerun")
    ap.add_argument("--arena", action="store_true",
                    help="time with ORT's CPU memory arena on (a second session; memory from the arena-off one)")
    ap.add_argument("--render", action="store_true", help="only print the table of --out")
    ap.add_argument("--export", nargs=3, metavar=("SCOPE", "VARIANT", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--run", nargs=3, metavar=("SCOPE", "PATH", "LENGTHS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    lengths_of = {"layer": [int(x) for x in a.layer_lengths.split(",") if x],
                  "model": [int(x) for x in a.model_lengths.split(",") if x]}
    if a.export:
        _export(a.export[0], a.export[1], a.block, max(lengths_of[a.export[0]]), Path(a.export[2]))
        return
    if a.run:
        scope = a.run[0]
        worker(scope, Path(a.run[1]), [int(x) for x in a.run[2].split(",")],
               a.runs if scope == "layer" else a.model_runs, a.warmup_below, a.arena)
        return
    out, variants = Path(a.out), a.variants.split(",")
    rows = _load(out, a.block)
    if a.render:
        print(render(rows))
        return
    # A fixed glibc mmap threshold: freed blocks above 128 KiB go back to the OS at once (the default threshold
    # rises to 32 MiB after the first large free, and freed heap blocks would hide in the next length's baseline).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    for scope, lengths in lengths_of.items():
        for v in variants:
            done = {r["L"] for r in rows if r["scope"] == scope and r["variant"] == v}
            todo = [L for L in lengths if L not in done]
            if not todo:
                continue
            # Exported for the scope's max length (logsparse's tree depth), whatever is left to run.
            common = ["--block", str(a.block), "--runs", str(a.runs), "--model-runs", str(a.model_runs),
                      "--warmup-below", str(a.warmup_below), *(["--arena"] if a.arena else []),
                      "--layer-lengths", a.layer_lengths, "--model-lengths", a.model_lengths]
            print(f"[combiner_latency] {scope} {v}: export, then L = {todo}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                keep = Path(a.export_dir) / f"{scope}-{v}-b{a.block}-L{max(lengths)}" if a.export_dir else Path(tmp)
                path = str(keep / "m.onnx")
                t0 = time.perf_counter()
                if not Path(path).exists():  # exported into a temporary folder, renamed when complete
                    part = keep.with_name(keep.name + ".part") if a.export_dir else keep
                    shutil.rmtree(part, ignore_errors=True) if a.export_dir else None
                    part.mkdir(parents=True, exist_ok=True)
                    p = subprocess.run([sys.executable, __file__, "--export", scope, v, str(part / "m.onnx"), *common],
                                       env=env, capture_output=True, text=True)
                    if p.returncode != 0:
                        print(f"[combiner_latency] {scope} {v} export failed: {p.stderr.strip().splitlines()[-1:]}",
                              file=sys.stderr)
                        continue
                    if part != keep:
                        os.replace(part, keep)
                export_s = round(time.perf_counter() - t0, 1)
                run = subprocess.Popen([sys.executable, __file__, "--run", scope, path, ",".join(map(str, todo)),
                                        *common], env=env, stdout=subprocess.PIPE, text=True)
                assert run.stdout is not None
                for line in run.stdout:  # each length is saved as soon as it is measured
                    if line.startswith("{") and "skipped" in line:
                        print(f"[combiner_latency] {scope} {v}: {line.strip()}", file=sys.stderr, flush=True)
                    elif line.startswith("{"):
                        rows.append({"scope": scope, "variant": v, "export_s": export_s, **json.loads(line)})
                        print(f"[combiner_latency] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
                        _save(out, a, rows)
                if run.wait() != 0:
                    print(f"[combiner_latency] {scope} {v} run failed (exit {run.returncode})", file=sys.stderr)
    _save(out, a, rows)
    print(render(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
