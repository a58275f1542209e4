#!/usr/bin/env bash
# One command for a GPU machine: flash-attn vs sdpa logits, then Open-Qwen2VL at real shapes
# (random weights, no download) under bf16 FSDP2 with and without compile and the chunked loss:
# tokens/s, TFLOPs/s, MFU, peak memory -> OUT/gpu_check.json and OUT/gpu_check.md.
# Without a GPU the same checks run at a tiny size on CPU.
#   bash bench/gpu_check.sh [OUT] [gpu_check.py options, e.g. --variants eager-full,eager-chunked]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
shift || true
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PYTHON" bench/gpu_check.py --out "$OUT" "$@"
