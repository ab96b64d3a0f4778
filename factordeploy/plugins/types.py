"""TensorRT DataType <-> the dtype names op specs use ("float32", "int32", ...)."""

from __future__ import annotations

from typing import Any

_TYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
               "INT8": "int8", "BOOL": "bool", "UINT8": "uint8"}


def trt_type_name(t: Any) -> str:
    return _TYPE_NAMES.get(getattr(t, "name", str(t)).split(".")[-1], str(t))


def trt_type(trt: Any, name: str) -> Any:
    inv = {v: k for k, v in _TYPE_NAMES.items()}
    return getattr(trt.DataType, inv[name])
