"""Export fidelity with polygraphy: the compressed torch model vs its ONNX under ONNX Runtime.

Polygraphy's own PytRunner moves inputs to CUDA, so `TorchRunner` is a CPU/GPU-agnostic
runner on polygraphy's BaseRunner; the comparison itself is polygraphy's Comparator with
CompareFunc.simple, so tolerances and statistics mean what polygraphy users expect.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CompareFunc

from ..engines.ort import providers


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


@dataclass
class FidelityResult:
    passed: bool
    atol: float
    rtol: float
    max_abs: float
    max_rel: float
    mean_abs: float
    iterations: int
    runners: tuple[str, str]

    def as_dict(self) -> dict:
        return self.__dict__ | {"runners": list(self.runners)}


def compare_torch_onnx(fn, onnx_path: str, feeds: list[dict[str, np.ndarray]], input_names: list[str],
                       output_name: str, atol: float, rtol: float, device: str = "cpu") -> FidelityResult:
    """Run both on the same real inputs; pass iff every element meets |a-b| <= atol + rtol*|b|."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # our report states the statistics; polygraphy's dump is noise
    torch_runner = TorchRunner(fn, input_names, output_name, device, name="torch")
    ort_runner = OnnxrtRunner(SessionFromOnnx(onnx_path, providers=providers()), name="onnxruntime")
    results = Comparator.run([torch_runner, ort_runner], data_loader=feeds)
    acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    groups = [acc] if hasattr(acc, "values") else list(acc)  # newer polygraphy: a sequence of AccuracyResult
    stats = [it[output_name] for g in groups for iters in g.values() for it in iters]
    return FidelityResult(
        passed=all(bool(g) for g in groups),
        atol=atol,
        rtol=rtol,
        max_abs=float(max(s.max_absdiff for s in stats)),
        max_rel=float(max(s.max_reldiff for s in stats)),
        mean_abs=float(np.mean([s.mean_absdiff for s in stats])),
        iterations=len(feeds),
        runners=("torch", "onnxruntime"),
    )
