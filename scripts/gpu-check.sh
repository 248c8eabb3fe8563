#!/usr/bin/env bash
# The device check: one run of at most TOTAL_S (default 420 s) on an offline
# GPU host with Python 3.12 and CuPy (cuda13) installed, so that a 600 s call
# has margin and a rerun still fits the device budget.
#
#   bash ../shared/gpu-wheels.sh onnx protobuf ml_dtypes
#                                     # fills .whl/ (RMM, Dask, ..., onnx for the
#                                     # conformance stage); cuda-bindings and
#                                     # cuda-pathfinder come from the image
#   bash scripts/gpu-check.sh         # on the device, with carry [".whl"]
#   bash scripts/gpu-check.sh --dry-run   # here, without a GPU: the same plumbing
# (env: OUT, TOTAL_S, WHEELS_DIR, STAGES="versions cpu-side gpu-tests onnx-model onnx bench", PYTHON)
#
# Wheels from .whl/ go into a temporary target on PYTHONPATH, except those of
# packages the image already has (cuda-bindings, cuda-pathfinder, CuPy, the
# nvidia-* libraries): a second cuda-bindings first on the path would shadow
# the image's, and needs a cuda-pathfinder of its own.  The versions stage
# says whether the image's cuda-bindings satisfies what rmm-cu13 requires.
#
# Stages run in their own process group (killed when the stage ends, so no
# Dask worker outlives it) under their own limit, capped by what is left of
# TOTAL_S.  Everything they write is packed into ONE archive,
# $OUT/gpu-check.tar.gz, next to a one-screen $OUT/summary.txt: two files
# come back from a device run (at most 8 may).
set -uo pipefail
DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-/tmp/kaas-gpu-out}
TOTAL_S=${TOTAL_S:-420}
WHEELS_DIR=${WHEELS_DIR:-.whl}
STAGES=" ${STAGES:-versions cpu-side gpu-tests onnx-model onnx bench} "
PACK_S=15 # kept for packing and the summary
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
LOGS=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$SECONDS
PY=${PYTHON:-python3}

note() { echo "$*" | tee -a "$SUMMARY"; }

# run_stage NAME LIMIT_S COMMAND...: output to $LOGS/NAME.log; one summary line.
run_stage() {
    local name=$1 limit=$2
    shift 2
    [[ $STAGES == *" $name "* || $name == install ]] || return 0
    local left=$((TOTAL_S - PACK_S - (SECONDS - START)))
    if ((left < 5)); then
        note "$name: not run (the ${TOTAL_S}s budget is spent)"
        return
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS rc
    echo "== $name (limit ${limit}s)"
    setsid timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1 &
    local pgid=$!
    wait "$pgid"
    rc=$?
    kill -TERM -- "-$pgid" 2> /dev/null && sleep 1
    kill -KILL -- "-$pgid" 2> /dev/null
    local tally
    tally=$(grep -aE '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$LOGS/$name.log" | tail -n 1 |
        tr -d '=' | sed 's/^ *//')
    local why=""
    ((rc == 124 || rc == 137)) && why=" TIMED OUT"
    note "$name: rc=$rc$why in $((SECONDS - t0))s${tally:+ - $tally}"
    grep -aE '^(FAILED|ERROR) ' "$LOGS/$name.log" | head -n 6 | cut -c1-150 | sed 's/^/    /' |
        tee -a "$SUMMARY"
}

note "gpu-check $( ((DRY)) && echo "DRY RUN (no GPU needed)" || echo "on the device") at $(date -u +%FT%TZ), budget ${TOTAL_S}s"
if command -v nvidia-smi > /dev/null; then
    {
        timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
        timeout 10 nvidia-smi | grep -m1 "CUDA Version"
    } > "$LOGS/nvidia-smi.txt" 2>&1
    head -n 3 "$LOGS/nvidia-smi.txt" | cut -c1-150 | sed 's/^/  /' | tee -a "$SUMMARY"
else
    note "  nvidia-smi: not found on this machine"
fi

# -- wheels: never shadow what the image has -------------------------------------
S=$(mktemp -d)
shopt -s nullglob
wheels=()
for w in "$WHEELS_DIR"/*.whl; do
    base=$(basename "$w")
    mod=""
    case $base in
        cuda_bindings-*) mod=cuda.bindings ;;
        cuda_pathfinder-*) mod=cuda.pathfinder ;;
        cuda_core-*) mod=cuda.core ;;
        cupy*) mod=cupy ;;
        nvidia_*) mod=nvidia ;;
    esac
    if [[ -n $mod ]] && $PY -c "import $mod" 2> /dev/null; then
        echo "skipped $base: the image has $mod" >> "$LOGS/wheels.txt"
        continue
    fi
    wheels+=("$w")
done
if ((${#wheels[@]})); then
    if ((DRY)); then
        printf 'would install %s\n' "${wheels[@]}" >> "$LOGS/wheels.txt"
        note "install: dry run, ${#wheels[@]} wheel(s) listed in wheels.txt"
    else
        run_stage install 40 $PY -m pip install -q --no-index --no-deps --target "$S" "${wheels[@]}"
    fi
else
    note "install: no wheels in $WHEELS_DIR/ (or all provided by the image)"
fi
[[ -f $LOGS/wheels.txt ]] && grep -c skipped "$LOGS/wheels.txt" | xargs -I{} echo "  {} wheel(s) left to the image" | tee -a "$SUMMARY"
export PYTHONPATH=$S:$PWD${PYTHONPATH:+:$PYTHONPATH}

read -r -d '' VERSIONS_PY << 'PY'
import importlib, importlib.metadata as md, platform
print("python", platform.python_version())
for name in ("cupy", "rmm", "cuda.bindings", "cuda.pathfinder", "numpy", "dask", "distributed"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", "?"))
    except Exception as e:
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
try:  # does the image's cuda-bindings satisfy what rmm requires?
    from packaging.requirements import Requirement
    for dist in ("rmm-cu13", "librmm-cu13"):
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.name in ("cuda-bindings", "cuda-python", "cuda-pathfinder") and not r.marker:
                have = md.version(r.name) if r.name != "cuda-python" else None
                ok = have is not None and r.specifier.contains(have, prereleases=True)
                print(f"{dist} needs {r}: image has {have} -> {'OK' if ok else 'TOO OLD/MISSING'}")
except Exception as e:
    print("requirement check failed:", type(e).__name__, e)
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

run_stage versions 20 $PY -c "$VERSIONS_PY"
grep -aE "needs|driver CUDA|NVRTC|NOT IMPORTABLE|^cupy |^rmm |^cuda.bindings " "$LOGS/versions.log" |
    head -n 10 | cut -c1-150 | sed 's/^/  /' | tee -a "$SUMMARY"

timeout_flag=()
if $PY -c "import pytest_timeout" 2> /dev/null; then
    timeout_flag=(--timeout 150)
fi
# The CUDA path's decisions (no GPU needed) on this host's versions.
run_stage cpu-side 60 $PY -m pytest -p no:cacheprovider -q -rs \
    --junitxml "$LOGS/cpu-side.xml" tests/test_cuda_logic.py tests/test_nvrtc.py \
    tests/test_gpu_review.py
# On a CPU machine these are collected and skipped with their reason.
run_stage gpu-tests 220 $PY -m pytest -m gpu -p no:cacheprovider -q -rs \
    "${timeout_flag[@]}" --junitxml "$LOGS/gpu-tests.xml" tests/test_gpu.py
if ((DRY)); then
    run_stage bench 20 $PY -m dask_kaas.bench.gpu --help
else
    run_stage bench 90 $PY -m dask_kaas.bench.gpu --json "$LOGS/bench-gpu.json"
    grep -a "target" "$LOGS/bench.log" | tail -n 4 | cut -c1-150 | sed 's/^/  /' |
        tee -a "$SUMMARY"
fi

# ONNX's own node conformance cases on the CUDA backend (kernels on CuPy),
# last: CuPy compiles each elementwise kernel on first use, so it gets what is left;
# needs the onnx wheel (see the top; ~17 MB of the 64 MiB carry); expected outputs come with the cases, no onnxruntime needed.
if $PY -c "import onnx" 2> /dev/null; then
    # ResNet-50 (seeded weights) against onnxruntime's CPU output, or against
    # the same graph on NumPy where the image has no onnxruntime.
    if ((DRY)); then
        run_stage onnx-model 60 $PY -m dask_kaas.onnx.model_check --backend cpu --model squeezenet
    else
        run_stage onnx-model 90 $PY -m dask_kaas.onnx.model_check --backend cuda --requests 5
    fi
    tail -n 2 "$LOGS/onnx-model.log" | cut -c1-300 | sed 's/^/  /' | tee -a "$SUMMARY"
    run_stage onnx 100 $PY -m dask_kaas.onnx.conformance \
        --backend "$( ((DRY)) && echo cpu || echo cuda)"
    grep -aE "^(operator|total)" "$LOGS/onnx.log" | tail -n 2 | cut -c1-150 | sed 's/^/  /' |
        tee -a "$SUMMARY"
else
    note "onnx: not run (no onnx module: bash ../shared/gpu-wheels.sh onnx protobuf ml_dtypes)"
fi

# -- one archive, one summary ------------------------------------------------------
cp "$SUMMARY" "$LOGS/summary.txt"
tar -czf "$OUT/gpu-check.tar.gz" -C "$LOGS" . 2> /dev/null
note "total $((SECONDS - START))s of ${TOTAL_S}s; archive $(du -h "$OUT/gpu-check.tar.gz" | cut -f1) with $(tar -tzf "$OUT/gpu-check.tar.gz" | grep -vc '/$') file(s)"
note "files returned from \$OUT: $(cd "$OUT" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"
rm -rf "$LOGS" "$S"
echo "== summary"
cat "$SUMMARY"
