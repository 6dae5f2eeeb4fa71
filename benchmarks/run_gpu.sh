#!/usr/bin/env bash
# One GPU session: environment, the test suite (CUDA tests run there), the GPU check and
# benchmark. Writes logs and results under $OUT (the device tool's output folder) or ./out.
# Usage: bash benchmarks/run_gpu.sh [pytest paths...]   (BENCH_ARGS=... for gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -x -p no:cacheprovider ${TEST_ARGS:-} "${@:-tests}" 2>&1 | tee "$OUT/pytest.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 benchmarks/gpu_check.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -80
fi
