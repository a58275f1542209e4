#!/usr/bin/env bash
# One set-up command: a virtual environment with the CPU build of torch 2.13.0 and vlmforge.
# Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv), then: source .venv/bin/activate
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: here this takes the CPU build from local disk; an unpinned torch
# would pull a multi-GB CUDA build.
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e "$here[dev]"
echo "vlmforge installed in $venv. Activate with: source $venv/bin/activate"
