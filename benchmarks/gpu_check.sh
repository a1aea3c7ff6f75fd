#!/usr/bin/env bash
# The checks a lent GPU is for, in at most 8 minutes (benchmarks/gpu_check.py): GPT-2 124M training
# MFU in bf16 with torch.compile and flash SDPA against transformers, greedy decode tokens/s at batch
# 1 and 32 against transformers' generate, and the default pipeline's wall time per stage on the GPU.
# Each part writes benchmarks/results/gpu_check.json as it ends, so a timeout keeps the earlier ones.
#
#   bash benchmarks/gpu_check.sh            # with the repo's .venv (make setup-test), or PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout 470 "$PYTHON" benchmarks/gpu_check.py --device cuda "$@"
