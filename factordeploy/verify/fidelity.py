"""The build's three output checks as polygraphy runners, each returning a verify.compare.Comparison.

- `compare_torch_onnx`: the compressed torch model vs model.onnx on ONNX Runtime (export fidelity).
  Polygraphy's own PytRunner moves inputs to CUDA, so `TorchRunner` is a CPU/GPU-agnostic runner
  on polygraphy's BaseRunner.
- `compare_onnx_graphs`: the reduced-precision TensorRT graph vs model.onnx, both on ONNX Runtime.
- `compare_engine_onnx`: the TensorRT engine (TrtRunner) vs model.onnx.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata

from ..engines.ort import providers
from .compare import Comparison, compare


class TorchRunner(BaseRunner):
    """Runs a callable (named inputs -> tensor) on torch; device follows the model."""

    def __init__(self, fn, input_names: list[str], output_name: str, device: str = "cpu", name: str | None = None):
        super().__init__(name=name, prefix="torch-runner")
        self.fn, self.input_names, self.output_name, self.device = fn, input_names, output_name, device

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for n in self.input_names:
            meta.add(n, np.int64, (-1, -1))
        return meta

    def infer_impl(self, feed_dict):
        with torch.no_grad():
            inputs = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in feed_dict.items()}
            t0 = time.perf_counter()
            out = self.fn(inputs)
            self.inference_time = time.perf_counter() - t0
        return OrderedDict([(self.output_name, out.float().cpu().numpy())])

    def deactivate_impl(self):
        pass


def compare_torch_onnx(fn, onnx_path: str, feeds: list[dict[str, np.ndarray]], input_names: list[str],
                       output_name: str, atol: float, rtol: float, device: str = "cpu") -> Comparison:
    """Run both on the same real inputs; pass iff every element meets |a-b| <= atol + rtol*|b|."""
    torch_runner = TorchRunner(fn, input_names, output_name, device, name="torch")
    ort_runner = OnnxrtRunner(SessionFromOnnx(onnx_path, providers=providers()), name="onnxruntime")
    return compare(torch_runner, ort_runner, feeds, output_name, atol, rtol)


def compare_onnx_graphs(reference: str, candidate: str, feeds: list[dict[str, np.ndarray]], atol: float = 1e-2,
                        rtol: float = 1e-2) -> Comparison:
    """Two ONNX files on ONNX Runtime (CPU), e.g. the fp16 TensorRT graph vs the fp32 model.onnx: checks
    the precision pass where the engine cannot run (not TensorRT's kernels)."""
    ref = OnnxrtRunner(SessionFromOnnx(str(reference), providers=["CPUExecutionProvider"]), name="onnxruntime")
    cand = OnnxrtRunner(SessionFromOnnx(str(candidate), providers=["CPUExecutionProvider"]), name="onnxruntime-trt-graph")
    return compare(ref, cand, feeds, None, atol, rtol)


def compare_engine_onnx(ptrt, engine_path: str, onnx_path: str, feeds: list[dict[str, np.ndarray]],
                        atol: float = 1e-3, rtol: float = 1e-3) -> Comparison:
    """The TensorRT engine (polygraphy TrtRunner) vs model.onnx on ONNX Runtime, on the same real inputs.

    Needs a GPU the engine supports; `ptrt` is polygraphy's TensorRT backend for that TensorRT."""
    engine = ptrt.TrtRunner(ptrt.EngineFromBytes(ptrt.BytesFromPath(str(engine_path))), name="tensorrt")
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=providers()), name="onnxruntime")
    return compare(ort_runner, engine, feeds, None, atol, rtol)
