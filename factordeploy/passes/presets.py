"""Named pass pipelines per target runtime."""

from __future__ import annotations

from .annotate import name_factorized
from .basic import fold_constants
from .pipeline import Pass
from .sparse_dict import sparse_dict_ort


def common_pipeline() -> list[Pass]:
    return [name_factorized, fold_constants]


def ort_pipeline() -> list[Pass]:
    """Graph for ONNX Runtime: standard ops only (custom-domain layers lowered last)."""
    return common_pipeline() + [sparse_dict_ort]
