#!/usr/bin/env bash
# Everything to run when a GPU machine is lent, in one go: the GPU tests, then case L.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (needs `pip install '.[gpu,test]'`)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${1:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "from dtm.cluster import gpu_unavailable_reason as r; print(r() or 'GPU ok')" \
    | tee -a "$out/gpu.txt"
timeout 300 python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
timeout 240 python benchmarks/throughput.py --cases L --device gpu --repeats 3 \
    --json "$out/throughput_L.json" 2>&1 | tee "$out/throughput_L.log"
