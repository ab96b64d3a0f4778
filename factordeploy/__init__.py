"""factordeploy: compress a trained transformer into factorized layers and deploy it via ONNX / TensorRT."""

__version__ = "0.1.0"
