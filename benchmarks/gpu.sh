#!/usr/bin/env bash
# Everything to run when a GPU machine is lent, in one go: the GPU tests, then case L.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (needs `pip install '.[gpu,test]'`)
# Case L runs even when a test fails (its figures are wanted either way); the exit status
# is non-zero if no GPU works, a GPU test fails or is skipped, or the benchmark fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${1:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
if ! python -c "
import sys
from dtm.runtime.cluster import gpu_unavailable_reason
reason = gpu_unavailable_reason()
print(reason or 'GPU ok')
sys.exit(reason is not None)" | tee -a "$out/gpu.txt"; then
    echo "gpu.sh: no working GPU, nothing run" >&2
    exit 1
fi
status=0
timeout 300 python -m pytest -q -rs -m gpu tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" \
    || status=1
if grep -q "skipped" "$out/test_gpu.log"; then
    echo "gpu.sh: a GPU test was skipped on a GPU machine" >&2
    status=1
fi
timeout 240 python benchmarks/throughput.py --cases L --device gpu --repeats 3 \
    --json "$out/throughput_L.json" 2>&1 | tee "$out/throughput_L.log" || status=1
exit "$status"
