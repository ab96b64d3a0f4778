"""ONNX Runtime CPU latency and peak memory: full attention vs Combiner patterns, one SmolLM2 attention layer
and the whole SmolLM2 forward, over sequence lengths; the crossover length and each variant's growth exponent.

    flock /work/locks/heavy.lock env OMP_NUM_THREADS=1 python benchmarks/combiner_latency.py \
        --layer-lengths 512,1024,2048,4096,8192 --model-lengths 512,1024,2048,4096,8192

Each (scope, variant) is exported once with a dynamic length (CombinerAttention lowered as `deploy build`
does for ONNX Runtime) and run in a fresh process, lengths in increasing order, so the process's peak RSS
after a length minus the RSS after the session was made is that length's own peak memory. Batch 1, one intra-op thread. Latency: median of --runs
after one warm-up. Exponent: least-squares slope of log(latency) on log(L). Writes
benchmarks/results/combiner_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("full", "combiner-fixed", "combiner-logsparse", "combiner-axial")
OUT = Path(__file__).resolve().parent / "results" / "combiner_latency.json"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _export(scope: str, variant: str, block: int, max_len: int, path: Path) -> None:
    import torch

    from factordeploy.attention import AttentionConfig, install_combiner
    from factordeploy.export import export_onnx
    from factordeploy.models.registry import load_model

    lm = load_model("smollm2")
    if variant != "full":
        install_combiner(lm.model, AttentionConfig(kind=variant, block=block, max_len=max_len))
    if scope == "model":
        export_onnx(lm, lm.model, path, batch=1, seq=max_len)
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


def worker(scope: str, path: Path, lengths: list[int], runs: int) -> None:
    """Runs an exported artifact in a fresh process (so the export's memory is not in the peak)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    base = _rss_mb()
    rng = np.random.default_rng(0)
    for L in lengths:
        if scope == "model":
            ids = rng.integers(100, 40000, size=(1, L), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        else:
            feeds = {"hidden": rng.standard_normal((1, L, 576)).astype(np.float32)}
        sess.run(None, feeds)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        print(json.dumps({"L": L, "median_ms": round(times[len(times) // 2], 2), "runs": runs,
                          "peak_mb": round(_rss_mb() - base, 1)}), flush=True)


def fit_exponent(rows: list[dict]) -> float | None:
    pts = [(math.log(r["L"]), math.log(r["median_ms"])) for r in rows]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer-lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--model-lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--block", type=int, default=64, help="Combiner block (64 ~ sqrt(4096))")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model-runs", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--export", nargs=3, metavar=("SCOPE", "VARIANT", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--run", nargs=2, metavar=("SCOPE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.export or a.run:
        scope = (a.export or a.run)[0]
        lengths = [int(x) for x in (a.layer_lengths if scope == "layer" else a.model_lengths).split(",") if x]
        if a.export:
            _export(scope, a.export[1], a.block, max(lengths), Path(a.export[2]))
        else:
            worker(scope, Path(a.run[1]), lengths, a.runs if scope == "layer" else a.model_runs)
        return
    rows: list[dict] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for scope, lengths in (("layer", a.layer_lengths), ("model", a.model_lengths)):
        if not lengths:
            continue
        for v in a.variants.split(","):
            common = ["--block", str(a.block), "--runs", str(a.runs), "--model-runs", str(a.model_runs),
                      "--layer-lengths", a.layer_lengths, "--model-lengths", a.model_lengths]
            print(f"[combiner_latency] {scope} {v} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                path = str(Path(tmp) / "m.onnx")
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, __file__, "--export", scope, v, path, *common], env=env,
                                   capture_output=True, text=True)
                export_s = round(time.perf_counter() - t0, 1)
                if p.returncode == 0:
                    p = subprocess.run([sys.executable, __file__, "--run", scope, path, *common], env=env,
                                       capture_output=True, text=True)
            if p.returncode != 0:
                print(f"[combiner_latency] {scope} {v} failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            rows.extend({"scope": scope, "variant": v, "export_s": export_s, **json.loads(line)}
                        for line in p.stdout.splitlines() if line.startswith("{"))
    summary = []
    for scope in ("layer", "model"):
        full = {r["L"]: r for r in rows if r["scope"] == scope and r["variant"] == "full"}
        for v in a.variants.split(","):
            rs = sorted((r for r in rows if r["scope"] == scope and r["variant"] == v), key=lambda r: r["L"])
            if not rs:
                continue
            faster = [r["L"] for r in rs if r["L"] in full and r["median_ms"] < full[r["L"]]["median_ms"]]
            summary.append({"scope": scope, "variant": v, "exponent": fit_exponent(rs),
                            "first_L_faster_than_full": faster[0] if faster and v != "full" else None})
    print(f"\n{'scope':6} {'variant':20} " + " ".join(f"{'L=' + str(L):>17}" for L in sorted({r['L'] for r in rows})))
    for s in summary:
        cells = {r["L"]: r for r in rows if r["scope"] == s["scope"] and r["variant"] == s["variant"]}
        line = " ".join(f"{cells[L]['median_ms']:>8.1f}ms/{cells[L]['peak_mb']:>5.0f}MB" if L in cells else " " * 17
                        for L in sorted({r['L'] for r in rows}))
        print(f"{s['scope']:6} {s['variant']:20} {line}   exp {s['exponent']}  crossover {s['first_L_faster_than_full']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"block": a.block, "threads": 1, "batch": 1, "rows": rows, "summary": summary,
                                       "command": " ".join(sys.argv)}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
