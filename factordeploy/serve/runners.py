"""Step runners: one cached forward step of a KV-cache decoder, behind one interface.

`generate.py` only calls `runner.step(feeds) -> {output name: array}` with the with-past
signature of export/kv_cache.py, so the runtime is swappable: ONNX Runtime on the built
model.onnx, the torch model itself (the reference the tests compare with), or an engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from torch import nn

from ..engines import ort as ortmod
from ..errors import UserError
from ..export.kv_cache import CacheSpec, is_with_past, torch_step


class StepRunner(Protocol):
    spec: CacheSpec
    name: str

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtStepRunner:
    """ONNX Runtime session over a with-past model.onnx (int8 artifacts included)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.path = Path(path)
        self.session: ort.InferenceSession = ortmod.session(self.path, threads=threads)
        inputs = self.session.get_inputs()
        if not is_with_past([i.name for i in inputs]):
            raise UserError(f"{self.path} has no KV-cache inputs (an encoder, or a decoder built before KV export)",
                            "rebuild the folder with `deploy build` from this version, for a causal LM")
        self.spec = CacheSpec.from_graph_inputs([(i.name, i.shape) for i in inputs])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


class TorchStepRunner:
    """The torch model (compressed or not) through the same cached step: the reference."""

    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.spec = CacheSpec.from_config(model.config)

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return torch_step(self.model, self.spec, feeds)
