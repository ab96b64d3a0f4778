"""fp16 / bf16 TensorRT graphs: precision is a property of the ONNX graph, not a builder flag.

TensorRT 10+ (strongly typed networks) and TensorRT-RTX have no FP16/BF16 builder flags: each
tensor's type comes from the graph. This pass rewrites a fp32 graph so it computes in fp16 or bf16
while its interface stays fp32 (what ORT and the user feed/read):
- float32 initializers and Constant-node tensors are converted (values clamped to the target's
  finite range first, so e.g. the attention mask's finfo(float32).min stays finite instead of
  becoming -inf and turning 0 * -inf into NaN),
- Cast(to=FLOAT) and ConstantOfShape(value: float32) produce the target type instead,
- float32 graph inputs get a Cast to the target type, float32 outputs a Cast back to float32,
- stale value_info is dropped (TensorRT and ORT re-infer types).
Own pass rather than onnxconverter-common: that converter handles fp16 only (no bf16), and it is
not a dependency here. Only the TensorRT graph (model.trt.onnx) is converted; model.onnx stays fp32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .pipeline import Pass, PassContext

TARGETS = {"fp16": (TensorProto.FLOAT16, np.float16), "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}
PRECISIONS = ("fp32", *TARGETS)  # every --precision value, listed once


def _convert_tensor(t: onnx.TensorProto, np_type: type, onnx_type: int) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t)
    lim = float(np.finfo(np_type).max) if np_type is np.float16 else float(ml_dtypes.finfo(np_type).max)
    arr = np.clip(arr, -lim, lim).astype(np_type)
    if np_type is np.float16:
        out = numpy_helper.from_array(arr, t.name)
    else:  # bf16: raw bits, avoids relying on from_array's ml_dtypes support
        out = helper.make_tensor(t.name, onnx_type, arr.shape, arr.view(np.uint16).tobytes(), raw=True)
    return out


def _rename(nodes, old: str, new: str, outputs: bool) -> None:
    """Point every use of tensor `old` (inputs, and outputs too when asked) at `new`."""
    for node in nodes:
        for names in (node.input, node.output) if outputs else (node.input,):
            for j, x in enumerate(names):
                if x == old:
                    names[j] = new


def to_precision(precision: str) -> Pass:
    """A pass converting the graph's fp32 compute to `precision` ("fp16" | "bf16")."""
    onnx_type, np_type = TARGETS[precision]

    def run(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        g = model.graph
        n_init = n_const = n_cast = 0
        for i, t in enumerate(list(g.initializer)):
            if t.data_type == TensorProto.FLOAT:
                g.initializer[i].CopyFrom(_convert_tensor(t, np_type, onnx_type))
                n_init += 1
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_convert_tensor(a.t, np_type, onnx_type))
                    n_const += 1
                elif node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = onnx_type
                    n_cast += 1
        new_nodes = []
        for inp in g.input:
            if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
                cast_out = inp.name + "__" + precision
                _rename(g.node, inp.name, cast_out, outputs=False)
                new_nodes.append(helper.make_node("Cast", [inp.name], [cast_out], name=f"fd/precision/in/{inp.name}",
                                                  to=onnx_type))
        for out in g.output:
            if out.type.tensor_type.elem_type == TensorProto.FLOAT:
                low = out.name + "__" + precision
                _rename(g.node, out.name, low, outputs=True)
                g.node.append(helper.make_node("Cast", [low], [out.name], name=f"fd/precision/out/{out.name}",
                                               to=TensorProto.FLOAT))
        for k, nd in enumerate(new_nodes):
            g.node.insert(k, nd)
        del g.value_info[:]
        ctx.note(f"precision-{precision}", initializers=n_init, constants=n_const, casts_retargeted=n_cast,
                 io_casts=len(new_nodes) + sum(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in g.output))
        return model

    return Pass(f"precision-{precision}", run, f"compute in {precision}, fp32 inputs/outputs (TensorRT graph only)")
