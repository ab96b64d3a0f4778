"""int8 for the ONNX Runtime artifact: onnxruntime's dynamic quantization of every constant-weight MatMul.

A factorized layer's graph is plain MatMuls on constant factors (low-rank A^T and B^T, the
sparse dictionary D, a refolded or 2:4 weight), so each factor is quantized as the MatMul it
is (per output channel, int8 weights, activations quantized per call); nothing names a layer
kind. Embedding tables are quantized too (Gather on int8 data, dequantized rows). A MatMul
whose weight is Transpose(constant) - a tied LM head reading the embedding table - gets its own
pre-transposed constant first, so it is quantized as a MatMul as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..compress.quantize import MODES
from ..errors import UserError
from ..export.onnx_files import load_onnx


@dataclass
class QuantizeResult:
    mode: str
    path: str
    bytes_before: int
    bytes_after: int
    matmuls_quantized: int
    matmuls_total: int

    def as_dict(self) -> dict:
        return self.__dict__ | {"ratio": round(self.bytes_after / max(self.bytes_before, 1), 4)}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown --quantize '{mode}'", "use --quantize " + ", ".join(MODES)
                        + " (w8/w4/w2: weight-only, every stored factor; int8: ONNX Runtime dynamic int8)")


def _const_matmuls(proto: onnx.ModelProto) -> int:
    inits = {i.name for i in proto.graph.initializer}
    return sum(1 for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits)


def pretranspose_weights(proto: onnx.ModelProto) -> int:
    """MatMul(x, Transpose(W)) with W constant -> MatMul(x, W^T as its own constant); returns how many."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    done = 0
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producers:
            continue
        tr = producers[node.input[1]]
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        if tr.op_type != "Transpose" or tr.input[0] not in inits or perm not in (None, [1, 0]):
            continue
        w = numpy_helper.to_array(inits[tr.input[0]])
        if w.ndim != 2:
            continue
        name = f"{tr.input[0]}__transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(w.T.copy(), name)
            proto.graph.initializer.append(inits[name])
        node.input[1] = name
        done += 1
    # the bypassed Transposes and any constant only they read are dead now: drop them (else the fp32
    # weights would stay in the file beside their int8 copies)
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    dead = [n for n in proto.graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]
    for n in dead:
        proto.graph.node.remove(n)
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    for init in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(init)
    return done


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True) -> QuantizeResult:
    """Dynamic int8 quantization of `src` into `dst` (constant-weight MatMul/Gemm, embedding Gathers)."""
    import logging
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    external = os.path.exists(str(src) + ".data")
    proto = load_onnx(src)
    total = _const_matmuls(proto)
    untied = pretranspose_weights(proto)
    total += untied
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # quantize_dynamic logs each skipped node
    with tempfile.TemporaryDirectory(dir=dst.parent) as td:
        prep = Path(td) / "prepared.onnx"
        onnx.save_model(proto, str(prep), save_as_external_data=external, location="prepared.onnx.data")
        del proto
        quantize_dynamic(str(prep), str(dst), op_types_to_quantize=["MatMul", "Gemm", "Gather"], per_channel=per_channel,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
                         use_external_data_format=external)
    after = onnx.load(str(dst), load_external_data=False)
    done = sum(1 for n in after.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"))
    return QuantizeResult("int8", str(dst), _file_bytes(src), _file_bytes(dst), done, total)


def _file_bytes(p: Path) -> int:
    data = Path(str(p) + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def exact_nbits_copy(src: str | Path, dst: str | Path) -> bool:
    """Write `src` with every MatMulNBits at accuracy_level 0 (fp32 compute of the stored codes) to `dst`;
    False (nothing written) when `src` has no MatMulNBits node above level 0."""
    proto = load_onnx(src)
    changed = 0
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level" and a.i != 0:
                    a.i = 0
                    changed += 1
    if not changed:
        return False
    external = os.path.exists(str(src) + ".data")
    onnx.save_model(proto, str(dst), save_as_external_data=external, location=Path(dst).name + ".data")
    return True


def ort_weight_only(src: str | Path, dst: str | Path, bits: int, block: int = 32,
                    op_types: tuple[str, ...] = ("MatMul",)) -> QuantizeResult:
    """ONNX Runtime's own weight-only quantizer on `src` (MatMulNBitsQuantizer: symmetric, RTN, `block`,
    accuracy level 4): the one line a user runs instead of this project, the anchor every sweep and
    benchmark compares with. Weights read through Transpose(constant) (a tied LM head) get their own
    pre-transposed constant first, so every constant-weight MatMul is quantized, as for int8."""
    import logging
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as td:
        # ORT's basic level folds Transpose(W) and other constant subgraphs, so every linear is
        # MatMul(x, initializer): what MatMulNBitsQuantizer quantizes (as a user's exported file would be)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(td) / "folded.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        proto = load_onnx(Path(td) / "folded.onnx")
    pretranspose_weights(proto)
    total = _const_matmuls(proto)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits, accuracy_level=4,
                                       op_types_to_quantize=op_types)
    q = MatMulNBitsQuantizer(proto, algo_config=cfg)
    q.process()
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    q.model.save_model_to_file(str(tmp), use_external_data_format=False)
    os.replace(tmp, dst)
    after = onnx.load(str(dst), load_external_data=False)
    done = sum(1 for n in after.graph.node if n.op_type == "MatMulNBits")
    return QuantizeResult(f"ort-w{bits}", str(dst), _file_bytes(src), _file_bytes(dst), done, total)
