#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# -q unless the caller chose the verbosity (a second -q would drop pytest's closing line);
# one worker per core (pytest-xdist) unless the caller chose -n / --numprocesses
quiet=-q
workers="-n auto"
for arg in "$@"; do
  case "$arg" in
    -q*|-v*|--quiet|--verbose) quiet= ;;
    -n*|--numprocesses*|no:xdist) workers= ;;  # no:xdist: from "-p no:xdist"
  esac
done
python -m pytest $quiet $workers "$@"
