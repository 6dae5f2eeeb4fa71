#!/usr/bin/env bash
# Create .venv (if missing) and install compile_norm with its test extras.
# torch is pinned to the CPU build that lies on disk unless a torch is already installed:
# a bare "torch" requirement would pull a multi-GB CUDA build.
# One line per step on stderr (stdout stays the caller's); pip itself stays quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
say "updating pip"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU build; a few minutes the first time)"
  python -m pip install -q "torch==2.13.0"
else
  say "torch $(python -c 'import torch; print(torch.__version__)') already installed"
fi
say "installing compile_norm and its dev, hf extras (editable)"
# setuptools' editable build warns (a box of asterisks) that a folder named like the package
# may shadow it on import: that folder is the package itself here.
PYTHONWARNINGS="ignore::UserWarning" python -m pip install -q -e ".[dev,hf]"
say "done: $(python -c 'import compile_norm; print("compile_norm", compile_norm.__version__)') in .venv"
