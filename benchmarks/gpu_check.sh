#!/usr/bin/env bash
# The GPU path of spotocc in one script, for a CUDA machine that has only the project's files.
# About 8 minutes on one H100 (a hard deadline, GPU_CHECK_BUDGET_S, stops it in time):
#
#   1. a virtual environment (reusing a CUDA torch already installed on the machine) and
#      pip install -e ".[dev]";
#   2. the spconv CUDA build that matches torch (spotocc doctor --spconv-wheel), in place of the
#      CPU-only spconv that the dev extra installs;
#   3. spotocc doctor --device cuda --json;
#   4. pytest -m cuda (tests/cuda/);
#   5. spotocc benchmark --compare spotocc_nusc_256 sparseocc_nusc_256 --device cuda, with
#      --mode infer and --mode train, each with and without --amp bf16.
#
# Everything goes under one output folder: summary.txt (one line per step: PASS / FAIL / TIMEOUT /
# SKIP, seconds, command), every step's log, doctor.json, the benchmarks' JSON, the pytest report,
# and all of it packed as gpu_check.tar.gz. Exit status 0 only when every step passed.
#
# Usage:  benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]      (OUT_DIR default: $OUT, else gpu_check_out)
# --dry-run writes the summary with the commands it would run, and runs nothing.
# Environment:
#   PYTHON               interpreter for the virtual environment (default: python3)
#   VENV                 where it goes (default: ${TMPDIR:-/tmp}/spotocc-gpu-check-venv); VENV=none installs
#                        into PYTHON's own environment (a python that is itself in a virtual environment
#                        with a CUDA torch: a new one would not see that torch)
#   WHEELS               a folder of wheels, for a machine without a package index (pip --no-index)
#   GPU_CHECK_BUDGET_S   the deadline in seconds (default: 480)
#   GPU_CHECK_TAR_ONLY=1 keep only summary.txt and gpu_check.tar.gz in OUT_DIR (few files to copy back)
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then
    echo "usage: benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]" >&2
    exit 2
fi
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/spotocc-gpu-check-venv}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((SECONDS + BUDGET_S))
RUN_DIR="$OUT_DIR/gpu_check"  # the logs and JSON files
SUMMARY="$OUT_DIR/summary.txt"
if [[ "$VENV" == none ]]; then
    PY=$(command -v "$PYTHON") || { echo "gpu_check.sh: no $PYTHON" >&2; exit 2; }
else
    PY="$VENV/bin/python"
fi
SPOTOCC=("$PY" -m spotocc.cli)
PIP_ARGS=(--disable-pip-version-check)
if [[ -n "${WHEELS:-}" ]]; then
    PIP_ARGS+=(--no-index --find-links "$WHEELS")
fi
FAILED=0
mkdir -p "$RUN_DIR"
: >"$SUMMARY"

# step NAME LIMIT_S COMMAND...: run COMMAND (output to RUN_DIR/NAME.log) within LIMIT_S and before the
# deadline; one line in the summary; the command's success as the status.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [[ $DRY_RUN == 1 ]]; then
        printf '%-26s %-7s %4ss  %s\n' "$name" "DRY-RUN" "$limit" "$*" >>"$SUMMARY"
        return 0
    fi
    if ((left < 20)); then
        printf '%-26s %-7s %4ds  %s\n' "$name" "SKIP" 0 "(out of time) $*" >>"$SUMMARY"
        FAILED=1
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS status rc
    timeout --kill-after=10 "$limit" "$@" >"$RUN_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    [[ $rc == 0 ]] || FAILED=1
    printf '%-26s %-7s %4ds  %s\n' "$name" "$status" "$((SECONDS - start))" "$*" >>"$SUMMARY"
    echo "   $status in $((SECONDS - start)) s (log: $RUN_DIR/$name.log)"
    return "$rc"
}

{
    echo "spotocc GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
    echo
} >>"$SUMMARY"

# 1. virtual environment and the project; --system-site-packages keeps a CUDA torch already installed
if [[ "$VENV" != none ]]; then
    step venv 120 "$PYTHON" -m venv --system-site-packages "$VENV"
fi
if ! step install 240 "$PY" -m pip install "${PIP_ARGS[@]}" -e ".[dev]"; then
    # no package index: the project alone, its dependencies already on the machine (or in WHEELS)
    step install-no-deps 120 "$PY" -m pip install "${PIP_ARGS[@]}" --no-deps --no-build-isolation -e .
fi

# 2. spconv's CUDA build for this torch, in place of the CPU-only build of the dev extra
if [[ $DRY_RUN == 1 ]]; then
    WHEEL='$(spotocc doctor --spconv-wheel)'
else
    WHEEL=$("${SPOTOCC[@]}" doctor --spconv-wheel 2>>"$RUN_DIR/spconv-wheel.log")
fi
echo "spconv build for this torch: ${WHEEL:-none}" >>"$RUN_DIR/spconv-wheel.log"
if [[ -z "$WHEEL" || "$WHEEL" == "spconv" ]]; then
    printf '%-26s %-7s %4ds  %s\n' spconv-cuda FAIL 0 \
        "no spconv CUDA build: torch is CPU-only or too old (see gpu_check/spconv-wheel.log)" >>"$SUMMARY"
    FAILED=1
else
    step spconv-uninstall-cpu 60 "$PY" -m pip uninstall -y spconv
    step spconv-cuda 180 "$PY" -m pip install "${PIP_ARGS[@]}" "$WHEEL"
fi
if [[ $DRY_RUN == 0 ]]; then
    "$PY" -m pip list --disable-pip-version-check >"$RUN_DIR/pip-list.log" 2>&1
fi

# 3. the installation, proven on the GPU
step doctor 120 "${SPOTOCC[@]}" doctor --device cuda --json "$RUN_DIR/doctor.json"

# 4. the CUDA tests
step pytest-cuda 240 "$PY" -m pytest -m cuda tests -q -ra -p no:cacheprovider \
    --junitxml="$RUN_DIR/pytest-cuda.xml"

# 5. the two decoders side by side on nuScenes-sized inputs
for mode in infer train; do
    for amp in none bf16; do
        step "benchmark-$mode-$amp" 150 "${SPOTOCC[@]}" benchmark --compare spotocc_nusc_256 sparseocc_nusc_256 \
            --device cuda --mode "$mode" --amp "$amp" --json "$RUN_DIR/benchmark-$mode-$amp.json"
    done
done

{
    echo
    if [[ $DRY_RUN == 1 ]]; then
        echo "dry run: nothing ran"
    elif [[ $FAILED == 0 ]]; then
        echo "OK: every step passed"
    else
        echo "FAILED: see the steps above"
    fi
    echo "total: $SECONDS s of a ${BUDGET_S} s budget"
} >>"$SUMMARY"
cp "$SUMMARY" "$RUN_DIR/summary.txt"
tar -czf "$OUT_DIR/gpu_check.tar.gz" -C "$OUT_DIR" gpu_check
if [[ "${GPU_CHECK_TAR_ONLY:-0}" == 1 ]]; then
    rm -rf "$RUN_DIR"
fi
cat "$SUMMARY"
exit "$FAILED"
