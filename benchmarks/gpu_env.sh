# Sourced by the GPU scripts (run_gpu.sh, run_suite.sh) from the repository root: the output
# folder, PYTHONPATH with this checkout, carried wheels (.whl: Liger, ...) and the package
# itself installed offline so the backend's torch_dynamo_backends entry point is registered.
OUT=${OUT:-out}; mkdir -p "$OUT"
export OUT PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "warning: editable install failed; backend='compile_norm' needs an import" >&2
