"""Named pass pipelines per target runtime."""

from __future__ import annotations

from .annotate import name_factorized
from .basic import fold_constants
from .custom_ops import inline_native_ops, lower_custom_ops, mark_plugin_nodes, op_functions, plugin_inputs
from .pipeline import Pass
from .precision import to_precision
from .sparsity import verify_2to4


def common_pipeline() -> list[Pass]:
    # verify-2to4 checks only layers whose manifest declares a 2:4 weight (a no-op otherwise).
    return [name_factorized, fold_constants, verify_2to4]


def ort_pipeline(lowering: dict[str, str] | None = None) -> list[Pass]:
    """Graph for ONNX Runtime: standard ops only (custom nodes replaced by one of their lowerings).

    name-factorized runs first so the lowered nodes keep their fd/<layer>/ names; `lowering` maps an
    op name to its policy ("cost": per node by the op's cost model, or one lowering for all).
    """
    return common_pipeline() + [lower_custom_ops(lowering)]


def trt_pipeline(precision: str = "fp32") -> list[Pass]:
    """Graph for TensorRT / TensorRT-RTX: plugin nodes kept and marked for the parser; precision in the graph.

    inline-native-ops: native ops (QDQ weights) become the standard ops TensorRT reads itself.
    op-functions: the TensorRT graph also carries each op's standard-op body as an ONNX local
    function, so ONNX Runtime (and polygraphy --onnxrt) can run the same file."""
    passes = common_pipeline() + [inline_native_ops, plugin_inputs, mark_plugin_nodes, op_functions]
    if precision != "fp32":
        passes.append(to_precision(precision))
        passes.append(verify_2to4)  # the 2:4 pattern must also survive the precision cast
    return passes
