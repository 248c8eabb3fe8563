#!/usr/bin/env bash
# The device check, in one run of at most 10 minutes on an offline GPU host
# with Python 3.12 and CuPy (cuda13) installed.  Before it, fill .whl/ here:
#   bash ../shared/gpu-wheels.sh 'cuda-bindings>=13.0.1,<14'
# (rmm-cu13 needs cuda-bindings), then run it with carry [".whl"]:
#   bash scripts/gpu-check.sh
# It installs the wheels into a temporary target, prints the versions that
# decide the CUDA path, and runs its stages under their own time limits
# (10+10+50+20+60+240+150 = 540 s).  Each stage runs in its own process group, which
# is killed when the stage ends, so no Dask worker outlives its stage.
# Logs, JUnit XML and the micro-benchmark figures (bench-gpu.json) go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/kaas-gpu-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
: > "$OUT/summary.txt"

# run_stage NAME LIMIT_S COMMAND...: COMMAND's output goes to $OUT/NAME.log.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc
    echo "== $name (limit ${limit}s)"
    setsid timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1 &
    local pgid=$!
    wait "$pgid"
    rc=$?
    kill -TERM -- "-$pgid" 2> /dev/null && sleep 2
    kill -KILL -- "-$pgid" 2> /dev/null
    echo "$name rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    tail -n 12 "$OUT/$name.log"
}

{
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    timeout 10 nvidia-smi | grep -m1 "CUDA Version"
} > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"

S=$(mktemp -d)
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    run_stage install 50 python3 -m pip install -q --no-index --no-deps --target "$S" "${wheels[@]}"
else
    echo "no wheels in .whl/: using what is installed" | tee -a "$OUT/summary.txt"
fi
export PYTHONPATH=$S:$PWD

read -r -d '' VERSIONS_PY << 'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("cupy", "rmm", "cuda.bindings", "numpy", "dask", "distributed", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
try:
    import cupy
    rt = cupy.cuda.runtime
    d = rt.driverGetVersion()
    print("driver CUDA %d.%d" % (d // 1000, d % 1000 // 10))
    print("cupy CUDA runtime", rt.runtimeGetVersion(), "cupy NVRTC", cupy.cuda.nvrtc.getVersion())
    print("devices", rt.getDeviceCount(), "compute capability",
          cupy.cuda.Device(0).compute_capability)
except Exception as e:
    print("cupy CUDA query failed:", type(e).__name__, e)
try:
    from dask_kaas.device import nvrtc
    print("cuda-bindings NVRTC", nvrtc.nvrtc_version(), "archs", nvrtc.supported_archs())
except Exception as e:
    print("cuda-bindings NVRTC unavailable:", type(e).__name__, e)
PY

run_stage versions 20 python3 -c "$VERSIONS_PY"

timeout_flag=()
if python3 -c "import pytest_timeout" 2> /dev/null; then
    timeout_flag=(--timeout 200)
fi
# The CUDA path's decisions (no GPU needed) on this host's versions.
run_stage cpu-side 60 python3 -m pytest -p no:cacheprovider -q -rs \
    --junitxml "$OUT/cpu-side.xml" tests/test_cuda_logic.py tests/test_nvrtc.py
run_stage gpu-tests 240 python3 -m pytest -m gpu -p no:cacheprovider -q -rs \
    "${timeout_flag[@]}" --junitxml "$OUT/gpu-tests.xml" tests/test_gpu.py
run_stage bench 150 python3 -m dask_kaas.bench.gpu --json "$OUT/bench-gpu.json"
echo "== summary"
cat "$OUT/summary.txt"
