"""Measured decode latency of a stored form, per kernel, on ONNX Runtime's CPU provider.

Why: at batch 1 on this CPU the weight kernels' speed differs by form far more than their bytes say (measured, one thread: a 576 x 1536 MatMulNBits takes 34 us at 4 bits
block 32, 26 us at block 128, 49 us at 8 bits, 149 us as an fp32 MatMul). `--method auto
--budget-latency` therefore needs each candidate's latency, measured where it will run.

Each kernel kind (fp32 MatMul; MatMulNBits at a bit width, block and symmetry, at the accuracy level the
build deploys) is timed at batch 1 on a few shapes, as a chain of independent nodes in one session, and
fitted as `c0 + c1 * K_padded * N` (a call overhead plus a cost per multiply-add); a form's latency is
the sum over the nodes its layer exports (layers.py: a factor stays fp32 where quantizing it would not
save bytes). The fitted coefficients are cached per ONNX Runtime version, CPU and thread count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.registry import cache_dir
from ..ops.quant_matmul import ACCURACY_LEVEL, pack_nbits
from .quant import QuantSpec, quant_bytes

SHAPES = ((576, 16), (32, 576), (576, 576), (576, 1536), (1536, 576))  # (K, N) timed per kernel kind: the fit's points
CHAIN = 16  # independent nodes per timed session: per-run overhead spread, weights beyond the caches
CACHE_VERSION = 1


@dataclass(frozen=True)
class Kernel:
    """One kernel kind: bits 32 = fp32 MatMul; otherwise MatMulNBits(bits, block, symmetric)."""

    bits: int = 32
    block: int = 32
    symmetric: bool = True

    @property
    def key(self) -> str:
        return "fp32" if self.bits == 32 else f"w{self.bits}g{self.block}{'s' if self.symmetric else 'z'}"

    def padded_k(self, K: int) -> int:
        return K if self.bits == 32 else -(-K // self.block) * self.block


def factor_kernel(K: int, N: int, spec: QuantSpec | None) -> Kernel:
    """The kernel a (K -> N) factor stored at `spec` runs as: fp32 where quantizing saves no bytes."""
    if spec is None or quant_bytes(K, N, spec) >= K * N * 4:
        return Kernel()
    return Kernel(spec.bits, spec.block, spec.symmetric)


def _chain_model(kernel: Kernel, K: int, N: int, seed: int = 0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], []
    for i in range(CHAIN):
        y = f"y{i}"
        if kernel.bits == 32:
            inits.append(numpy_helper.from_array((rng.standard_normal((K, N)) * 0.02).astype(np.float32), f"W{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"W{i}"], [y]))
        else:
            nb = -(-K // kernel.block)
            q = rng.integers(0, 2 ** kernel.bits, size=(nb * kernel.block, N), dtype=np.int64).astype(np.uint8)
            inits += [numpy_helper.from_array(pack_nbits(q, kernel.bits, kernel.block), f"B{i}"),
                      numpy_helper.from_array((rng.random(N * nb) * 0.01 + 1e-3).astype(np.float32), f"S{i}")]
            ins = ["x", f"B{i}", f"S{i}"]
            if not kernel.symmetric:
                per = 8 // kernel.bits
                inits.append(numpy_helper.from_array(
                    rng.integers(0, 256, size=N * -(-nb // per), dtype=np.int64).astype(np.uint8), f"Z{i}"))
                ins.append(f"Z{i}")
            nodes.append(helper.make_node("MatMulNBits", ins, [y], domain="com.microsoft", K=K, N=N, bits=kernel.bits,
                                          block_size=kernel.block, accuracy_level=ACCURACY_LEVEL))
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, N]))
    graph = helper.make_graph(nodes, "latency", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def time_kernel(kernel: Kernel, K: int, N: int, threads: int, repeats: int = 5, runs: int = 40) -> float:
    """Microseconds per node at batch 1 (median of `repeats` timings of `runs` session runs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(_chain_model(kernel, K, N).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    for _ in range(5):
        sess.run(None, {"x": x})
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, {"x": x})
        ts.append((time.perf_counter() - t0) / runs / CHAIN * 1e6)
    return float(np.median(ts))


def fit_kernel(kernel: Kernel, threads: int) -> tuple[float, float]:
    """(c0 us, c1 us per multiply-add) by least squares over SHAPES."""
    macs = np.array([kernel.padded_k(K) * N for K, N in SHAPES], dtype=np.float64)
    us = np.array([time_kernel(kernel, K, N, threads) for K, N in SHAPES])
    A = np.stack([np.ones_like(macs), macs], axis=1)
    c0, c1 = np.linalg.lstsq(A, us, rcond=None)[0]
    return max(float(c0), 0.0), max(float(c1), 0.0)


def _cache_path(threads: int) -> Path:
    import onnxruntime as ort

    root = cache_dir()
    cpu = "".join(ch if ch.isalnum() else "-" for ch in (platform.processor() or platform.machine()))[:40]
    return root / "latency" / f"ort{ort.__version__}-{cpu}-{os.cpu_count()}cpu-t{threads}.json"


@dataclass
class LatencyModel:
    """Fitted per-kernel coefficients; `us(kernel, K, N)` predicts one node's batch-1 latency."""

    threads: int
    coef: dict[str, tuple[float, float]]

    def us(self, kernel: Kernel, K: int, N: int) -> float:
        c0, c1 = self.coef[kernel.key]
        return c0 + c1 * kernel.padded_k(K) * N

    def factor_us(self, K: int, N: int, spec: QuantSpec | None) -> float:
        return self.us(factor_kernel(K, N, spec), K, N)


def latency_model(kernels: set[Kernel], threads: int = 1, cache: bool = True, on_measure=None) -> LatencyModel:
    """Coefficients for `kernels` at `threads`, measured once per machine (cached JSON) and reused."""
    path = _cache_path(threads)
    saved: dict = {}
    if cache and path.exists():
        try:
            doc = json.loads(path.read_text())
            saved = doc["coef"] if doc.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError, KeyError):
            saved = {}
    coef = {k: tuple(v) for k, v in saved.items()}
    todo = sorted({k for k in kernels | {Kernel()} if k.key not in coef}, key=lambda k: k.key)
    for k in todo:
        if on_measure is not None:
            on_measure(k)
        coef[k.key] = fit_kernel(k, threads)
    if todo and cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "threads": threads, "coef": coef}, indent=1))
        os.replace(tmp, path)
    return LatencyModel(threads, coef)
