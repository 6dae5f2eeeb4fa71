#!/usr/bin/env bash
# The benchmark suite on a GPU machine: Liger from the carried wheel (if any), then
# benchmarks/suite.py (quick set by default). Writes suite.md / suite.json / suite.log under
# $OUT (the device tool's output folder) or ./out.
# Usage: bash benchmarks/run_suite.sh [suite.py args...]   e.g. --full, --tune, --families ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 benchmarks/suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log" | tail -150
