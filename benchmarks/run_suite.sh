#!/usr/bin/env bash
# The benchmark suite on a GPU machine: Liger from the carried wheel (if any), then
# benchmarks/suite.py (quick set by default). Writes suite.md / suite.json / suite.log under
# $OUT (the device tool's output folder) or ./out.
# Usage: bash benchmarks/run_suite.sh [suite.py args...]   e.g. --full, --tune, --families ...
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
python3 benchmarks/suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log" | tail -150
