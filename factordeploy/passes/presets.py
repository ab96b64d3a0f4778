"""Named pass pipelines per target runtime."""

from __future__ import annotations

from .annotate import name_factorized
from .basic import fold_constants
from .pipeline import Pass
from .sparsity import verify_2to4


def common_pipeline() -> list[Pass]:
    # verify-2to4 checks only sparse24/densesparse layers of the manifest (a no-op otherwise).
    return [name_factorized, fold_constants, verify_2to4]


def ort_pipeline() -> list[Pass]:
    """Graph for ONNX Runtime: standard ops only."""
    return common_pipeline()
