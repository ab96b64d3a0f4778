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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata

from ..engines.ort import providers
from ..export import kv_cache
from ..models import text as textmod
from ..models.registry import LoadedModel
from .compare import Comparison, compare


class TorchRunner(BaseRunner):
    """Runs a callable (named inputs -> tensor, or -> {output name: array}) on torch; device follows the model."""

    def __init__(self, fn, input_names: list[str], output_name: str, device: str = "cpu", name: str | None = None):
        super().__init__(name=name, prefix="torch-runner")
        self.fn, self.input_names, self.output_name, self.device = fn, input_names, output_name, device

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for n in self.input_names:
            if n.startswith("past_key_values."):
                meta.add(n, np.float32, (-1, -1, -1, -1))
            else:
                meta.add(n, np.int64, (-1, -1))
        return meta

    def infer_impl(self, feed_dict):
        with torch.no_grad():
            inputs = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in feed_dict.items()}
            t0 = time.perf_counter()
            out = self.fn(inputs)
            self.inference_time = time.perf_counter() - t0
        if isinstance(out, dict):
            return OrderedDict((k, np.asarray(v, dtype=np.float32)) for k, v in out.items())
        return OrderedDict([(self.output_name, out.float().cpu().numpy())])

    def deactivate_impl(self):
        pass


def compare_torch_onnx(fn, onnx_path: str, feeds: list[dict[str, np.ndarray]], input_names: list[str],
                       output_name: str | list[str], atol: float, rtol: float, device: str = "cpu",
                       error_stat: str = "elemwise") -> Comparison:
    """Run both on the same real inputs; pass iff every element of every compared output meets
    |a-b| <= atol + rtol*|b|. `output_name` may list several outputs (a decoder's logits and every
    present key/value); `fn` then returns a dict of them. `error_stat="mean"` checks the mean
    |a-b| against atol instead (quantized artifacts: a few int8-rounded outliers are expected)."""
    names = [output_name] if isinstance(output_name, str) else list(output_name)
    torch_runner = TorchRunner(fn, input_names, names[0], device, name="torch")
    ort_runner = OnnxrtRunner(SessionFromOnnx(onnx_path, providers=providers()), name="onnxruntime")
    return compare(torch_runner, ort_runner, feeds, names, atol, rtol, error_stat)


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


@dataclass
class CheckPlan:
    """What the export check runs: the torch reference, its inputs and the compared outputs."""

    fn: Callable[[dict[str, torch.Tensor]], Any]
    feeds: list[dict[str, np.ndarray]]
    input_names: list[str]
    output_names: list[str]


def text_feeds(loaded: LoadedModel) -> list[dict[str, np.ndarray]]:
    """Real tokenized held-out text at two shapes (dynamic axes exercised)."""
    sents = textmod.sentences(textmod.evaluation_articles())
    feeds = []
    for i, (n, max_len) in enumerate(((2, 32), (4, 64))):
        enc = loaded.encode(sents[i * 8:i * 8 + n], max_len)
        feeds.append({k: v.numpy() for k, v in enc.items()})
    return feeds


def check_plan(loaded: LoadedModel, model: torch.nn.Module, decode_steps: int = 3, with_past: bool = True) -> CheckPlan:
    """Encoders (and decoders exported without a cache): the output on real text at two shapes.
    Decoders (KV-cache graph): a prefill with past length 0 and `decode_steps` cached steps per
    prompt batch, comparing logits and every present key/value (export/kv_cache.py)."""
    if loaded.kind != "decoder" or not with_past:
        return CheckPlan(lambda x: loaded.output(model, x), text_feeds(loaded), list(loaded.input_names),
                         [loaded.output_name])
    spec = kv_cache.CacheSpec.from_config(model.config)
    stream = loaded.token_ids(textmod.evaluation_articles()[:2])
    prompts = [loaded.batch_from_ids(textmod.sample_windows(stream, b, s, seed=1234))["input_ids"].numpy()
               for b, s in ((2, 32), (4, 64))]
    feeds = kv_cache.check_feeds(spec, model, prompts, steps=decode_steps)
    np_fn = lambda x: kv_cache.torch_step(model, spec, {k: v.cpu().numpy() for k, v in x.items()})  # noqa: E731
    return CheckPlan(np_fn, feeds, spec.input_names, spec.output_names)
