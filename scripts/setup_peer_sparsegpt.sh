#!/usr/bin/env bash
# Optional, idempotent: a separate venv (PEER_VENV, default /work/peer-venv) with llm-compressor, the maintained
# SparseGPT reference that benchmarks/peer_sparsegpt.py runs against our sparse24 --score sparsegpt. Separate
# because llmcompressor pins transformers (<=5.17) and compressed-tensors; this project runs on newer transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PEER_VENV:-/work/peer-venv}
LLMC=${LLMCOMPRESSOR_VERSION:-0.14.0.1}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch first and pinned (CPU build): letting llmcompressor resolve plain `torch` would pull a CUDA build;
# the pin is repeated on the llmcompressor line so the resolver can never replace it.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -c "import llmcompressor" 2>/dev/null \
  || "$VENV/bin/python" -m pip install -q "llmcompressor==$LLMC" "torch==2.13.0" safetensors accelerate
echo "peer venv: $("$VENV/bin/python" -c 'import importlib.metadata as m, torch, transformers; print("llmcompressor", m.version("llmcompressor"), "| compressed-tensors", m.version("compressed-tensors"), "| transformers", transformers.__version__, "| torch", torch.__version__)')"
