"""TensorRT engines of weight-only quantized artifacts on a datacenter GPU (issue 20): latency and bytes.

For one model, `deploy build --backend trt` of w8 (`quant-lowrank --bits 8 --lowrank-bytes 0`: every block
linear at 8 bits), w4 (GPTQ) and quant-lowrank w4 + a rank correction, each with `--quantize-head`. Then each engine runs under
polygraphy's TrtRunner at batch 1 for the given sequence lengths (decode-like 1 and prefill 128), median
of CUDA-event-timed runs. Expectation: decode (seq 1) is weight-bandwidth bound, so the w4 engines should
run at or below w8 (TensorRT's weight-only INT4/INT8 GEMM kernels) and quant-lowrank within ~1.15x of w4
(two rank-r GEMMs added); at prefill 128 the three should be within ~1.2x of each other. A row above those bounds is a finding to report, not a failure of the script.

    PYTHONPATH=. python benchmarks/gpu/quant_engines.py --model minilm --json benchmarks/results/gpu-quant-engines.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "w8": "--method quant-lowrank --bits 8 --lowrank-bytes 0 --quantize-head",
    "w4-gptq": "--method quant-lowrank --bits 4 --lowrank-bytes 0 --quant-algo gptq --quantize-head --embedding-bits 4",
    "ql4-gptq": "--method quant-lowrank --bits 4 --lowrank-bytes 0.02 --quant-algo gptq --quantize-head --embedding-bits 4",
}


def build(model: str, name: str, flags: str, work: Path, calib: int) -> Path:
    out = work / name
    cmd = [sys.executable, "-m", "factordeploy.cli", "build", "--model", model, "--backend", "trt", "--no-baseline",
           "--no-eval", "--calib", str(calib), "--out", str(out), "--overwrite", "--quiet", *shlex.split(flags)]
    subprocess.run(cmd, check=True)
    return out


def time_engine(folder: Path, seq: int, runs: int) -> float:
    import numpy as np
    import torch
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from benchmarks.gpu.timing import cuda_median_ms

    with TrtRunner(EngineFromBytes(BytesFromPath(str(folder / "model.engine")))) as runner:
        feeds = {}
        for meta_name, meta in runner.get_input_metadata().items():
            shape = [1 if d in (-1, None) or isinstance(d, str) else d for d in meta.shape]
            if len(shape) >= 2:
                shape[1] = seq if meta_name in ("input_ids", "attention_mask", "token_type_ids", "position_ids") else shape[1]
            dt = np.int64 if "int" in str(meta.dtype) else np.float32
            feeds[meta_name] = np.ones(shape, dtype=dt) if meta_name == "attention_mask" else np.zeros(shape, dtype=dt)
        return cuda_median_ms(lambda: runner.infer(feeds), runs=runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seqs", default="1,128")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--work", type=Path, default=Path("build/gpu_quant_engines"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    for name, flags in VARIANTS.items():
        t0 = time.perf_counter()
        folder = build(a.model, name, flags, a.work, a.calib)
        rep = json.loads((folder / "report.json").read_text())
        row = {"variant": name, "build_s": round(time.perf_counter() - t0, 1),
               "engine_mb": round(rep["engine"]["engine_bytes"] / 1e6, 1),
               "onnx_mb": round((folder / "model.onnx").stat().st_size / 1e6, 1)}
        for s in (int(x) for x in a.seqs.split(",")):
            row[f"ms_seq{s}"] = round(time_engine(folder, s, a.runs), 3)
        rows.append(row)
        print(row, flush=True)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
