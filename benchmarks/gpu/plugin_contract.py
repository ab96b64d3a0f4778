"""Prove each plugin op's kernel contract on a GPU, outside TensorRT.

For every registered op with an `example`, this does what the plugin's `enqueue` does, step by step:
allocate the input/output buffers, view the raw device pointers as torch tensors through the same
`device_tensor` helper enqueue uses (no copies), enter `torch.cuda.ExternalStream` on a non-default
stream, call `spec.launch(inputs, outputs, attrs)` - the same grid, num_warps, num_stages, constexprs
and argument order - synchronize, and compare with `spec.reference` (torch). It prints the compiled
kernel's name, grid, block (num_warps * 32), shared memory and target, then times the kernel against
the torch reference (median of --runs CUDA-event timings).

    python benchmarks/gpu/plugin_contract.py [--op ScaledMatMul --test-ops] [--dtype fp16] [--scales 1 8] [--json out.json]

Needs a CUDA GPU with torch + triton. NOT RUN on the development machine (no GPU was lent to this
task); on a CPU machine it exits with a message instead of failing silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cuda_median_ms  # noqa: E402


def _time(fn, runs: int) -> float:
    return cuda_median_ms(fn, runs, warmup=3)


def check_op(spec, scale: int, dtype, runs: int) -> dict:
    import torch

    from factordeploy.ops.spec import IntAlgebra
    from factordeploy.plugins.trt_plugin import device_tensor

    name = str(dtype).replace("torch.", "")
    inputs, attrs = spec.example(scale, dtype, "cuda")
    attrs = spec.attr_values(attrs)
    out_shapes = spec.output_shapes([list(t.shape) for t in inputs], attrs, IntAlgebra())
    out_types = spec.resolve_types([str(t.dtype).replace("torch.", "") for t in inputs])
    outputs = [torch.full(s, float("nan"), dtype=getattr(torch, t), device="cuda") for s, t in zip(out_shapes, out_types)]
    # exactly what enqueue sees: raw pointers + dims + TensorRT type names
    ins = [device_tensor(t.data_ptr(), t.shape, str(t.dtype).replace("torch.", "")) for t in inputs]
    outs = [device_tensor(t.data_ptr(), t.shape, str(t.dtype).replace("torch.", "")) for t in outputs]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(torch.cuda.ExternalStream(stream.cuda_stream)):
        launch = spec.launch(ins, outs, attrs)
        compiled = launch()
    stream.synchronize()
    ref = spec.reference(*inputs, **attrs)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    errs = [float((o.float() - r.float()).abs().max()) for o, r in zip(outputs, ref)]
    ok = all(torch.allclose(o.float(), r.float(), atol=tol, rtol=tol) for o, r in zip(outputs, ref))
    md = getattr(compiled, "metadata", None)
    row = {
        "op": spec.name, "dtype": name, "scale": scale, "inputs": [list(t.shape) for t in inputs],
        "grid": list(launch.grid), "num_warps": launch.num_warps, "block": launch.num_warps * 32,
        "num_stages": launch.num_stages, "constexprs": launch.constexprs,
        "kernel": getattr(md, "name", None), "shared_mem": getattr(md, "shared", None),
        "target": str(getattr(md, "target", "")), "max_abs_err": max(errs), "passed": bool(ok),
        "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
    }
    row["kernel_ms"] = round(_time(lambda: spec.launch(ins, outs, attrs)(), runs), 4)
    row["torch_reference_ms"] = round(_time(lambda: spec.reference(*inputs, **attrs), runs), 4)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", action="append", help="op name(s); default: all registered ops with an example")
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--test-ops", action="store_true", help="also register the test-only ScaledMatMul (tests/)")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("plugin_contract: no CUDA GPU visible to torch; this benchmark must run on a GPU machine.")
        return 2
    from factordeploy.ops import all_ops

    if a.test_ops:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.scaled_matmul_op import registered

        registered()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    rows = []
    for name, spec in sorted(all_ops().items()):
        if (a.op and name not in a.op) or spec.example is None:
            continue
        for s in a.scales:
            r = check_op(spec, s, dtype, a.runs)
            rows.append(r)
            print(f"{r['op']} {r['dtype']} x{r['inputs'][0]}: {'PASS' if r['passed'] else 'FAIL'} max|err| "
                  f"{r['max_abs_err']:.3g}; grid {r['grid']} block {r['block']} smem {r['shared_mem']} "
                  f"({r['target']}); kernel {r['kernel_ms']} ms vs torch {r['torch_reference_ms']} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0 if rows and all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
