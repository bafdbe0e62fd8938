#!/usr/bin/env bash
# The accelerator benchmark on a GPU machine, as one command: makes (or reuses) a CUDA jax venv, runs
# benchmarks/accelerator.py with its defaults (within 8 minutes; the first run also writes and prepares the
# 800 synthetic patches the pipeline reads) and says where the JSON landed.
#
#   bash benchmarks/run_accelerator_gpu.sh [more accelerator.py flags, e.g. --batches 32,64]
#
# VENV: the venv with `pip install -e .[cuda12]` (default .venv-cuda; made when missing).
# TORCH_PYTHON: python of a venv with CUDA torch for the PyTorch reference (default /tmp/torchvenv/bin/python
#   when it exists; make one with `python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch
#   numpy`); TORCH_PYTHON=none leaves torch out.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-cuda}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with jax[cuda12] ..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -e ".[cuda12]"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
"$VENV/bin/python" -c "import jax; print('jax', jax.__version__, jax.devices())" >&2

args=()
TORCH_PYTHON=${TORCH_PYTHON:-/tmp/torchvenv/bin/python}
if [ "$TORCH_PYTHON" != none ] && [ -x "$TORCH_PYTHON" ]; then
  args+=(--torch-python "$TORCH_PYTHON")
else
  echo "no torch python: the PyTorch reference is left out" >&2
fi

json=$(mktemp)
trap 'rm -f "$json"' EXIT
# Progress goes to stderr; stdout is the report, which names the file it was written to.
"$VENV/bin/python" benchmarks/accelerator.py ${args[@]+"${args[@]}"} "$@" >"$json"
out=$("$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["out"])' "$json")
echo "JSON written to $out"
