#!/usr/bin/env bash
# The device check for a session lent a GPU machine (one `run` of the device
# tool, with carry: [".whl"] after ../shared/gpu-wheels.sh filled .whl/ here).
# Installs the wheels, runs the GPU tests and the GPU micro-benchmark, and
# leaves logs and figures under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/kaas-gpu-out}
mkdir -p "$OUT"
S=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$S" .whl/*.whl > "$OUT/install.log" 2>&1
export PYTHONPATH=$S:$PWD
{ nvidia-smi; python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount())"; } \
    > "$OUT/machine.txt" 2>&1
timeout 420 python3 -m pytest -m gpu -p no:cacheprovider -q -x --timeout 300 tests/test_gpu.py \
    > "$OUT/pytest-gpu.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest-gpu.log"
timeout 240 python3 -m dask_kaas.bench.gpu --json "$OUT/bench-gpu.json" > "$OUT/bench-gpu.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench-gpu.log"
tail -5 "$OUT/pytest-gpu.log" "$OUT/bench-gpu.log"
