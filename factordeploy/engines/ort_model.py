"""An ONNX Runtime artifact behind a transformers model's call signature.

Quality probes (verify/quality.py) call `model(input_ids=..., attention_mask=...)` and read
`.logits` or `.last_hidden_state`; wrapping the session this way lets the same probes score the
deployed file itself (e.g. the int8 artifact), not the torch model it came from.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..export.kv_cache import CacheSpec, is_with_past, step_inputs
from .ort import session


class OrtModel:
    """Callable like a HF model on CPU tensors; a KV-cache graph is run as one prefill (past length 0)."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.session = session(path, threads=threads)
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.spec = CacheSpec.from_graph_inputs([(i.name, i.shape) for i in inputs]) if is_with_past(self.input_names) else None
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw) -> SimpleNamespace:
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        if self.spec is not None:
            feeds = step_inputs(feeds["input_ids"], feeds["attention_mask"]) | self.spec.empty_past(input_ids.shape[0])
        elif "token_type_ids" in self.input_names:
            tt = kw.get("token_type_ids")
            feeds["token_type_ids"] = tt.cpu().numpy() if tt is not None else np.zeros_like(feeds["input_ids"])
        out = torch.from_numpy(self.session.run([self.output_name], feeds)[0])
        return SimpleNamespace(**{self.output_name: out})

    def eval(self) -> "OrtModel":
        return self
