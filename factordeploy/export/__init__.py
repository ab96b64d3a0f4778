"""export/: torch -> ONNX (custom-domain nodes for layers ONNX lacks)."""

from .onnx_export import ExportResult, export_onnx, validate_onnx

__all__ = ["ExportResult", "export_onnx", "validate_onnx"]
