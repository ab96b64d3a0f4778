"""ScaledMatMul, a TEST-ONLY op proving the op layout: y = alpha * (x @ w), then ReLU if relu != 0.

It lives in tests/ (no method emits it) and reaches the framework only through
`factordeploy.ops.register_op(SPEC)`, called by the tests that use it (`registered()` below): a new
op needs its own folder plus one registration line, nothing in passes/, plugins/ or engines/.

x [..., K] (activation, dynamic leading dims), w [K, N] (a constant initializer in practice),
attributes alpha (float) and relu (int). Small enough to check by hand, yet it exercises every
part of the mechanism: a constant weight input, a float and an int attribute, an output shape that
mixes two inputs' dims, a float type variable, a Triton kernel launch and a standard-op decomposition.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from factordeploy.ops import register_op
from factordeploy.ops.body import Body
from factordeploy.ops.spec import AotKernel, Attr, Launch, OpSpec


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    x, w = dims
    return [list(x[:-1]) + [w[-1]]]


def reference(x, w, alpha: float = 1.0, relu: int = 0):
    import torch

    y = (x.float() @ w.float()) * alpha
    if relu:
        y = torch.relu(y)
    return (y.to(x.dtype),)


def body(b: Body, inputs: list, outputs: list, attrs: dict) -> None:
    """MatMul -> Mul(alpha) [-> Relu], alpha in the weight's dtype (fp32 in the ORT artifact)."""
    import onnx_graphsurgeon as gs

    x, w = inputs
    y = outputs[0]
    dtype = w.values.dtype if isinstance(w, gs.Constant) else np.float32
    mm = b.op("MatMul", [x, w], "mm_out", dtype=y.dtype)
    alpha = b.const("alpha", np.array(attrs["alpha"], dtype=dtype))
    if attrs["relu"]:
        b.op("Relu", [b.op("Mul", [mm, alpha], "scaled", dtype=y.dtype)], "relu", out=y)
    else:
        b.op("Mul", [mm, alpha], "scaled", out=y)


def launch(inputs: list, outputs: list, attrs: dict) -> Launch:
    """The exact launch `enqueue` performs: x viewed as [M, K], grid over (M, N) tiles."""
    import torch
    import triton

    from . import kernel as k

    x, w = inputs
    y = outputs[0]
    K, N = int(w.shape[0]), int(w.shape[1])
    x2 = x.reshape(-1, K)
    y2 = y.view(-1, N)
    M = int(x2.shape[0])
    grid = (triton.cdiv(M, k.BLOCK_M), triton.cdiv(N, k.BLOCK_N))
    return Launch(k.scaled_matmul_kernel, grid,
                  (x2, w, y2, M, N, K, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1),
                   y2.stride(0), y2.stride(1), float(attrs["alpha"])),
                  {"RELU": int(bool(attrs["relu"])), "IEEE": int(x.dtype == torch.float32),
                   "BLOCK_M": k.BLOCK_M, "BLOCK_N": k.BLOCK_N, "BLOCK_K": k.BLOCK_K},
                  num_warps=k.NUM_WARPS, num_stages=k.NUM_STAGES)


def example(scale: int, dtype, device: str) -> tuple[list, dict]:
    """Inputs at a transformer-like shape: x [8, 16*scale, 384], w [384, 1536] (MiniLM FFN up-projection)."""
    import torch

    g = torch.Generator().manual_seed(scale)
    x = torch.randn(8, 16 * scale, 384, generator=g).to(dtype=dtype, device=device)
    w = (torch.randn(384, 1536, generator=g) / 20).to(dtype=dtype, device=device)
    return [x, w], {"alpha": 0.5, "relu": 1}


SPEC = OpSpec(
    name="ScaledMatMul",
    inputs=("x", "w"), outputs=("y",),
    input_types=("T", "T"), output_types=("T",),
    attrs=(Attr("alpha", "float", 1.0, "output scale"), Attr("relu", "int", 0, "1: apply ReLU after scaling")),
    output_shapes=_shapes,
    reference=reference,
    body=body,
    local_function=False,  # the body reads alpha/relu
    launch=launch,
    aot=lambda *a: aot(*a),
    example=lambda scale, dtype, device: example(scale, dtype, device),
    doc=__doc__ or "",
)


def registered() -> OpSpec:
    """The one registration line a new op needs (here called by the tests that use the op)."""
    return register_op(SPEC)


def aot(inputs: list, outputs: list, attrs: dict, trtp, in_types: list[str]) -> AotKernel:
    """Full TensorRT QDP: the same kernel compiled ahead of time (alpha/relu baked in as constants).

    Argument order QDP uses: input pointers, output pointers, then extra int32 args. Written, not run
    (no full TensorRT on the development machine)."""
    from . import kernel as k

    x, w = inputs
    y = outputs[0]
    xs, ws = x.shape_expr, w.shape_expr
    m = xs[0]
    for i in range(1, x.ndim - 1):
        m = m * xs[i]
    kdim, n = ws[0], ws[1]
    ty = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[in_types[0]]
    # kernel(x, w, y, M, N, K, sxm, sxk, swk, swn, sym, syn, alpha, RELU, IEEE, BLOCK_*): strides of contiguous
    # row-major [M, K], [K, N], [M, N] are (K, 1), (N, 1), (N, 1)
    signature = {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "y_ptr": f"*{ty}", "M": "i32", "N": "i32", "K": "i32",
                 "stride_xm": "i32", "stride_xk": "i32", "stride_wk": "i32", "stride_wn": "i32",
                 "stride_ym": "i32", "stride_yn": "i32", "alpha": "constexpr", "RELU": "constexpr",
                 "IEEE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    constants = {"alpha": float(attrs["alpha"]), "RELU": int(bool(attrs["relu"])), "IEEE": int(ty == "fp32"),
                 "BLOCK_M": k.BLOCK_M, "BLOCK_N": k.BLOCK_N, "BLOCK_K": k.BLOCK_K}
    extra = [trtp.SymInt32(e) for e in (m, n, kdim, kdim, 1, n, 1, n, 1)]
    return AotKernel(k.scaled_matmul_kernel, signature, constants,
                     (trtp.cdiv(m, k.BLOCK_M), trtp.cdiv(n, k.BLOCK_N)), extra)
