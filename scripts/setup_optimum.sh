#!/usr/bin/env bash
# Optional, idempotent: a separate venv (.venv-optimum) with Hugging Face Optimum (optimum-onnx), used by
# scripts/check_optimum.py and tests/test_serving_optimum.py to load build folders the way a user's serving
# stack would. Separate because optimum-onnx pins transformers 4.57 and this project runs on transformers 5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-optimum/bin/python ]; then
  "$PY" -m venv .venv-optimum
fi
# torch first and pinned (CPU build): letting optimum resolve plain `torch` would pull a CUDA build
.venv-optimum/bin/python -c "import torch" 2>/dev/null || .venv-optimum/bin/python -m pip install -q "torch==2.13.0"
.venv-optimum/bin/python -c "import optimum.onnxruntime" 2>/dev/null \
  || .venv-optimum/bin/python -m pip install -q "optimum-onnx[onnxruntime]" "torch==2.13.0"
echo "optimum venv: $(.venv-optimum/bin/python -c 'import transformers, optimum.onnxruntime, importlib.metadata as m; print("optimum-onnx", m.version("optimum-onnx"), "| transformers", transformers.__version__)')"
