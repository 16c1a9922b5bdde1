#!/usr/bin/env bash
# One prepared GPU check for a session that has a CUDA machine (issues 10 and 11).
#
#   tools/gpu_check.sh [--dry-run] OUTDIR [WHEEL]
#
# Run from the repository root. Installs the wheel built on the CPU machine
# (pip install --no-deps; default: the newest target/wheels/*.whl), prints the versions
# (GPU, driver, torch, CuPy, compute-sanitizer), then, each step under its own timeout
# and all of them under one budget (GPU_CHECK_BUDGET_S, default 470 s < 8 minutes):
#   smoke case -> pytest -m gpu -> bench/gpu.py -> bench/gpu_topk.py
#   -> compute-sanitizer memcheck and racecheck on a small case (where present).
# Writes at most 8 files into OUTDIR:
#   env.log install.log smoke.log pytest.log bench.log sanitizer.log
#   gpu-h200.json gpu_topk-h200.json
# Exit status: 0 every step passed; 1 a step failed or was cut by the budget;
# 2 usage error or no wheel; 3 no usable CUDA device (stops after the environment).
# --dry-run prints the plan (every command with its timeout) and runs nothing.
set -u -o pipefail

PY=${PYTHON:-python3}

find_sanitizer() {
    if [ -n "${CPPO_SANITIZER:-}" ]; then
        echo "$CPPO_SANITIZER"
    elif command -v compute-sanitizer >/dev/null 2>&1; then
        command -v compute-sanitizer
    elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
        echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
    fi
}

versions() {
    echo "date: $(date -u +%FT%TZ)"
    echo "wheel: ${WHEEL:-?}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
        nvidia-smi
    else
        echo "nvidia-smi: absent"
    fi
    local san
    san=$(find_sanitizer)
    if [ -n "$san" ]; then
        echo "compute-sanitizer: $san"
        "$san" --version | tail -n 2
    else
        echo "compute-sanitizer: absent (not on PATH nor in ${CUDA_HOME:-/usr/local/cuda}/bin)"
    fi
    "$PY" - <<'PYEOF'
import platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          "devices", torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu0", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
              round(p.total_memory / 2**30, 1), "GiB")
except Exception as exc:
    print("torch: unusable:", exc)
try:
    import cupy
    rt = cupy.cuda.runtime
    print("cupy", cupy.__version__, "runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion())
except Exception as exc:
    print("cupy: unusable:", exc)
try:
    import cppo_native
    print("cppo_native", cppo_native.__version__, "from", cppo_native.__file__)
except Exception as exc:
    print("cppo_native: not importable:", exc)
PYEOF
}

if [ "${1:-}" = "--versions" ]; then  # internal: the env step runs this under its timeout
    versions
    exit 0
fi

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ "${1:0:1}" = "-" ]; then
    echo "usage: tools/gpu_check.sh [--dry-run] OUTDIR [WHEEL]" >&2
    exit 2
fi
OUT=$1
WHEEL=${2:-}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)

if [ -z "$WHEEL" ]; then
    # shellcheck disable=SC2012  # newest by mtime; wheel names have no newlines
    WHEEL=$(ls -t target/wheels/*.whl 2>/dev/null | head -n 1)
fi
if [ -z "$WHEEL" ] || [ ! -f "$WHEEL" ]; then
    echo "gpu_check: no wheel (give its path, or build one first: maturin build --release)" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2

FAILED=()

# step NAME TIMEOUT LOG COMMAND...: runs COMMAND with its output appended to OUT/LOG,
# under min(TIMEOUT, what is left of the budget); records a failure, never aborts.
step() {
    local name=$1 limit=$2 log=$OUT/$3
    shift 3
    local now left rc
    now=$(date +%s)
    left=$((BUDGET - (now - START)))
    if [ "$DRY" = 0 ] && [ "$left" -lt 15 ]; then
        echo "=== $name: SKIPPED, the time budget is spent" | tee -a "$log"
        FAILED+=("$name(skipped)")
        return 1
    fi
    if [ "$limit" -gt "$left" ] && [ "$DRY" = 0 ]; then limit=$left; fi
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$log"
    if [ "$DRY" = 1 ]; then
        return 0
    fi
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name: rc=$rc after $(($(date +%s) - now))s" | tee -a "$log"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name(rc=$rc)")
        tail -n 25 "$log" | sed "s/^/    $name| /"
    fi
    return "$rc"
}

CPPO_SANITIZER=$(find_sanitizer)
export WHEEL

step install 40 install.log "$PY" -m pip install --no-deps --force-reinstall "$WHEEL"
step env 30 env.log bash "$0" --versions

if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no usable CUDA device (torch.cuda.is_available() is False); stopping after the" \
        "environment report in $OUT/env.log" | tee -a "$OUT/env.log" >&2
    exit 3
fi

step smoke 60 smoke.log "$PY" tools/gpu_smoke.py
step pytest 120 pytest.log "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=15 \
    tests/test_gpu.py tests/test_topk_logits_gpu.py tests/test_torch_backend.py tests/test_divergence.py \
    tests/test_loss_torch.py tests/test_loss_edge_cases.py tests/test_baselines.py
step bench_mask 140 bench.log "$PY" bench/gpu.py --iters 20 --out "$OUT/gpu-h200.json"
step bench_topk 60 bench.log "$PY" bench/gpu_topk.py --reps 20 --out "$OUT/gpu_topk-h200.json"
if [ -n "$CPPO_SANITIZER" ] || [ "$DRY" = 1 ]; then
    SAN=${CPPO_SANITIZER:-compute-sanitizer}
    step memcheck 45 sanitizer.log "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 \
        "$PY" tools/gpu_smoke.py --size small
    step racecheck 45 sanitizer.log "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 1 \
        --print-limit 20 "$PY" tools/gpu_smoke.py --size small
else
    echo "=== sanitizer: compute-sanitizer absent, memcheck and racecheck not run" | tee -a "$OUT/sanitizer.log"
fi

echo "gpu_check: $(($(date +%s) - START))s in all; files in $OUT:"
ls -l "$OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    exit 1
fi
if [ "$DRY" = 1 ]; then
    echo "gpu_check: dry run, nothing was run"
else
    echo "gpu_check: all steps passed"
fi
