#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: a Llama decoder block compiled with the compile_norm
# backend, what fused and its time against stock torch.compile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python examples/llama_block.py "$@"
