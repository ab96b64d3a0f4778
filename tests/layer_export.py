"""Export one layer (wrapped with a ReLU so its output feeds a real op) with dynamic batch/sequence."""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx
import torch


class Wrap(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.l = layer

    def forward(self, x):
        return torch.relu(self.l(x))


def export_layer(layer: torch.nn.Module) -> onnx.ModelProto:
    """The raw dynamo export of Wrap(layer) on x [2, 8, in] (layer manifest name "l")."""
    b, s = torch.export.Dim("b", min=1, max=64), torch.export.Dim("s", min=1, max=512)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(Wrap(layer).eval(), (torch.randn(2, 8, layer.in_features),), dynamo=True,
                                 input_names=["x"], output_names=["y"], dynamic_shapes={"x": {0: b, 1: s}},
                                 opset_version=18).model_proto
