#!/usr/bin/env bash
# The GPU checks of the budget work on a lent H100/H200 (see benchmarks/gpu_suite.py; run its --bundle here
# first and carry the parts it prints). Writes $OUT/gpu_suite.json and $OUT/gpu_suite.md; ends within 9 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site benchmarks/.gpu/wheels/*.whl
export PYTHONPATH="$PWD/benchmarks/.gpu/site:/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 530 python3 benchmarks/gpu_suite.py --out "${OUT:-benchmarks/.cache/gpu}"
