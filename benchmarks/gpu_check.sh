#!/usr/bin/env bash
# GPU check for a lent CUDA machine: no network there, torch + transformers preinstalled.
# pydantic (the config schema) is carried as wheels in .whl/ when missing (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 OUT=${OUT:-gpu_out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout "${GPU_CHECK_TIMEOUT:-250}" python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
