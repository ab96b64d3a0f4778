"""ONNX Runtime time and file size of the sparse_matmul op's two lowerings (row-padded gather vs dense refold).

For S of a MiniLM attention (384 x 384) and FFN-up (384 -> 1536) layer at SLTrain's delta, exports the
SparsePlusLowRankLinear's S alone, lowers it with each policy and times ORT (1 thread, fp32, median of
--runs) at M = 1 / 16 / 128 tokens; prints a table and writes JSON. The numbers calibrate the op's
cost model (ops/sparse_matmul/lowering.py).

    PYTHONPATH=. python benchmarks/sparse_matmul_ort.py [--delta 0.03] [--runs 15]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from layer_export import export_layer  # noqa: E402

from factordeploy.compress.layers import SparsePlusLowRankLinear  # noqa: E402
from factordeploy.passes.pipeline import PassContext, run_pipeline  # noqa: E402
from factordeploy.passes.presets import ort_pipeline  # noqa: E402
from factordeploy.progress import set_quiet  # noqa: E402


@click.command()
@click.option("--delta", type=float, default=0.03, show_default=True)
@click.option("--runs", type=int, default=15, show_default=True)
@click.option("--out", default=str(Path(__file__).parent / "results" / "sparse_matmul_ort.json"), show_default=True)
def main(delta: float, runs: int, out: str) -> None:
    set_quiet(True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n_in, n_out in [(384, 384), (384, 1536)]:
        nnz = round(delta * n_in * n_out)
        idx = torch.randperm(n_in * n_out, generator=g)[:nnz].sort().values
        layer = SparsePlusLowRankLinear(torch.zeros(1, n_in), torch.zeros(n_out, 1), idx, torch.randn(nnz, generator=g))
        raw = export_layer(layer)
        for how in ("gather", "dense"):
            proto = run_pipeline(raw, ort_pipeline({"SparseMatMul": how}), PassContext(layers={"l": layer.describe()}))
            so = ort.SessionOptions()
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for M in (1, 16, 128):
                x = np.random.default_rng(M).standard_normal((1, M, n_in)).astype(np.float32)
                for _ in range(3):
                    sess.run(None, {"x": x})
                ts = []
                for _ in range(runs):
                    t = time.perf_counter()
                    sess.run(None, {"x": x})
                    ts.append(time.perf_counter() - t)
                rows.append({"layer": f"{n_in}->{n_out}", "nnz": nnz, "lowering": how, "M": M,
                             "median_ms": round(statistics.median(ts) * 1e3, 3), "onnx_bytes": proto.ByteSize()})
    md = ["| S of layer | nnz | lowering | tokens | median ms | ONNX bytes |", "|---|---:|---|---:|---:|---:|"]
    md += [f"| {r['layer']} | {r['nnz']} | {r['lowering']} | {r['M']} | {r['median_ms']} | {r['onnx_bytes']:,} |" for r in rows]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"delta": delta, "runs": runs, "ort": ort.__version__, "rows": rows}, indent=1))
    click.echo("\n".join(md))


if __name__ == "__main__":
    main()
