"""An ONNX Runtime session behind the torch call signature the quality code uses.

`LoadedModel.output(model, inputs)` calls `model(**inputs)` and reads `.logits` or
`.last_hidden_state`; wrapping a session this way lets the same quality functions
(verify.quality.embed, window_perplexity) score a built model.onnx without a second copy
of the metric code. Graphs with a KV cache (`past_key_values.*` inputs) get an empty past.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..engines import ort as ortmod


class OrtModel(nn.Module):
    def __init__(self, onnx_path: str | Path, output_name: str) -> None:
        super().__init__()
        self.sess = ortmod.session(onnx_path)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.output_name = output_name

    def feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        ids = input_ids.cpu().numpy().astype(np.int64)
        given = {"input_ids": ids, "attention_mask": attention_mask.cpu().numpy().astype(np.int64),
                 "token_type_ids": (token_type_ids.cpu().numpy().astype(np.int64) if token_type_ids is not None
                                    else np.zeros_like(ids))}
        feeds = {}
        for name, meta in self.inputs.items():
            if name in given:
                feeds[name] = given[name]
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
            elif name.startswith("past_key_values"):
                shape = [ids.shape[0] if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(meta.shape)]
                feeds[name] = np.zeros(shape, dtype=np.float32)
            else:
                raise ValueError(f"model.onnx input '{name}' is not one this runner knows how to feed")
        return feeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                **_: object) -> SimpleNamespace:
        out = torch.from_numpy(self.sess.run([self.output_name], self.feeds(input_ids, attention_mask, token_type_ids))[0])
        return SimpleNamespace(logits=out, last_hidden_state=out)
