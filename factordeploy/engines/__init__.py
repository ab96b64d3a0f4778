"""engines/: build and run deployable engines (ONNX Runtime here; TensorRT / TensorRT-RTX beside it)."""
