#!/usr/bin/env bash
# One command for a CUDA machine: tokens/s and MFU of the pipeline's llama (~125M, ~1B; bf16;
# compile off/on; SDPA flash), document masking off/on, DeepSpeed ZeRO-2 and FSDP2 on one GPU,
# and DiT images/s, in under 8 minutes. Without CUDA it prints one line and exits 0.
# Extra arguments go to bench/gpu_check.py (e.g. --steps 20, or --cpu-smoke to test it on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" bench/gpu_check.py "$@"
