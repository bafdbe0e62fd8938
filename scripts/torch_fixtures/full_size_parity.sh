#!/usr/bin/env bash
# Full-size ResNet-18/50 torch -> JAX parity: the torch step in a throwaway torch venv, the JAX step in ours.
#
# Usage: scripts/torch_fixtures/full_size_parity.sh [DIR]   (DIR: where the .pth/.npz/parity.json go; a new
# temporary folder by default). TORCH_PYTHON (default /tmp/torchvenv/bin/python) needs torch, JAX_PYTHON
# (default .venv/bin/python) the project; torch never enters the project's environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
TORCH_PYTHON=${TORCH_PYTHON:-/tmp/torchvenv/bin/python}
JAX_PYTHON=${JAX_PYTHON:-.venv/bin/python}
DIR=${1:-$(mktemp -d -t full_size_parity.XXXXXX)}
"$TORCH_PYTHON" scripts/torch_fixtures/full_size_parity.py torch --dir "$DIR"
JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} "$JAX_PYTHON" scripts/torch_fixtures/full_size_parity.py jax \
  --dir "$DIR" --json "$DIR/parity.json"
