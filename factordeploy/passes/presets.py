"""Named pass pipelines per target runtime."""

from __future__ import annotations

from .annotate import name_factorized
from .basic import fold_constants
from .pipeline import Pass
from .plugin_nodes import decompose_plugin_nodes, mark_plugin_nodes
from .sparse_dict import make_sparse_dict_pass, sparse_dict_function, sparse_dict_ort, sparse_dict_trt
from .sparsity import verify_2to4


def common_pipeline() -> list[Pass]:
    # verify-2to4 checks only sparse24/densesparse layers of the manifest (a no-op otherwise).
    return [name_factorized, fold_constants, verify_2to4]


def ort_pipeline(sparse_dict: str = "cost") -> list[Pass]:
    """Graph for ONNX Runtime: standard ops only (plugin nodes replaced by their decompositions).

    name-factorized runs first so the lowered CoSpaDi nodes keep their fd/<layer>/ names;
    sparse-dict-ort picks gather vs dense per layer (`sparse_dict` = "cost", and logs why) or
    applies one decomposition to all, before the generic decomposition of the remaining plugin ops.
    """
    lower = sparse_dict_ort if sparse_dict == "cost" else make_sparse_dict_pass(sparse_dict)
    return common_pipeline() + [lower, decompose_plugin_nodes]


def trt_pipeline(precision: str = "fp32") -> list[Pass]:
    """Graph for TensorRT / TensorRT-RTX: plugin nodes kept and marked for the parser; precision in the graph."""
    # sparse-dict-function: the TensorRT graph also carries SparseDictMatMul's standard-op body as
    # an ONNX local function, so ONNX Runtime (and polygraphy --onnxrt) can run the same file.
    passes = common_pipeline() + [sparse_dict_trt, mark_plugin_nodes, sparse_dict_function]
    if precision != "fp32":
        from .precision import to_precision

        passes.append(to_precision(precision))
        passes.append(verify_2to4)  # the 2:4 pattern must also survive the precision cast
    return passes
