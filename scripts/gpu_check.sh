#!/usr/bin/env bash
# One command for a GPU machine: `bash scripts/gpu_check.sh` (or `make gpu-check`).
#
#   preflight  machine, driver, python, torch, nvcc, the tools below
#   build      `make build PYTHON=$PYTHON` with TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16: .venv
#              imports the machine's own torch (scripts/setup_venv.py), nothing downloaded
#              when the machine has the test tools
#   backends   regfuse.available_backends("cuda"); fails unless the compiled cuda backend is first
#   tests      the suite, CPU and CUDA, `-n 8` with pytest-xdist, a per-test timeout with
#              pytest-timeout
#   memcheck   compute-sanitizer memcheck on scripts/sanitizer_smoke.py (every op on the
#              cuda and triton backends, odd sizes, mixed dtypes, against the reference)
#   bench      benchmarks/run.py on CUDA (GPU_CHECK_BENCH_ARGS, default: no torch.compile)
#   racecheck  compute-sanitizer racecheck on the same script, if time is left
#
# Each step runs under `timeout` within an overall budget (GPU_CHECK_BUDGET_S, default 470 s,
# so that the whole run ends within 8 minutes on a 16-core H100 machine); a step whose
# turn comes after the budget is spent is skipped. Logs: one file per step and
# summary.txt (the preflight's output, then one line per step) in $GPU_CHECK_LOG_DIR, else
# $OUT, else build/gpu_check: eight files at most.
#
# Without a CUDA GPU (torch.cuda.is_available() false for $PYTHON) only the preflight runs,
# every other step is reported as skipped, and the exit status is 0. Exit status: 0 when
# every step that ran passed, 1 when one failed or timed out.
#
# GPU_CHECK_REHEARSE=1 runs every step on the CPU instead (the cpu backend; the sanitizer
# script without the sanitizer where there is none), to try this script where no GPU is;
# give it GPU_CHECK_BUDGET_S, GPU_CHECK_TESTS and GPU_CHECK_BENCH_ARGS to fit.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
PYTHON="${PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-.venv}"
PY="$VENV/bin/python"
LOG_DIR="${GPU_CHECK_LOG_DIR:-${OUT:-$repo_root/build/gpu_check}}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
TESTS="${GPU_CHECK_TESTS:-tests}"
TEST_WORKERS="${GPU_CHECK_TEST_WORKERS:-8}"
TEST_TIMEOUT_S="${GPU_CHECK_TEST_TIMEOUT_S:-120}"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---no-compile --repeat 3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
mkdir -p "$LOG_DIR"
summary="$LOG_DIR/summary.txt"
steps="$(mktemp)"
trap 'rm -f "$steps"' EXIT
started=$SECONDS
failed=0

note() { echo "gpu_check: $*" | tee -a "$steps"; }
record() { printf '%-10s %-40s %5s s\n' "$1" "$2" "$3" >>"$steps"; }

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under a timeout of CAP_SECONDS or what is
# left of the budget, whichever is less; output to the terminal and to NAME.log.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$((BUDGET_S - (SECONDS - started)))
  if [ "$left" -lt 15 ]; then
    echo "gpu_check: $name skipped: the ${BUDGET_S} s budget is spent"
    record "$name" "skipped (time budget spent)" 0
    return 1
  fi
  local limit=$((cap < left ? cap : left)) t0=$SECONDS rc
  echo "gpu_check: == $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    record "$name" "ok" "$took"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" "TIMEOUT after ${limit} s" "$took"; failed=1
  else
    record "$name" "FAILED (exit $rc)" "$took"; failed=1
  fi
  return "$rc"
}

skip() { record "$1" "skipped ($2)" 0; }

preflight() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"; uname -srm; echo "cores: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --version | head -n 2
  else
    echo "compute-sanitizer: not found"
  fi
  echo "PYTHON=$PYTHON ($(command -v "$PYTHON" || echo 'not found'))"
  "$PYTHON" - <<'EOF'
import importlib.util, sys
print("python", sys.version.split()[0], sys.prefix)
try:
    import torch
except ImportError:
    print("torch: not importable")
else:
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
for name in ("triton", "xdist", "pytest_timeout", "hypothesis", "pytest_benchmark", "matplotlib"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
EOF
}

export -f preflight
export PYTHON
step preflight 60 bash -c preflight
DEVICE=cuda
if [ -n "${GPU_CHECK_REHEARSE:-}" ]; then
  DEVICE=cpu
  note "rehearsal on the CPU (GPU_CHECK_REHEARSE): nothing here checks a GPU"
elif ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  DEVICE=none
fi
# The sanitizer when there is one; in a rehearsal without it, the script alone. No caching
# allocator under the sanitizer: an out-of-bounds access into memory torch keeps cached
# would look valid to it.
sanitizer() {
  local tool="$1"; shift
  if command -v compute-sanitizer >/dev/null; then
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      --print-limit 20 "$@"
  else
    echo "compute-sanitizer not found: running without it"; "$@"
  fi
}
export -f sanitizer

# `sanitized_step TOOL CAP`: scripts/sanitizer_smoke.py under compute-sanitizer's TOOL as
# step TOOL; skipped on a GPU without the sanitizer, run bare in a rehearsal without it.
sanitized_step() {
  local tool="$1" cap="$2"
  if [ "$DEVICE" = cuda ] && ! command -v compute-sanitizer >/dev/null; then
    skip "$tool" "compute-sanitizer not found"
  else
    step "$tool" "$cap" bash -c "sanitizer $tool \"\$@\"" _ "$PY" scripts/sanitizer_smoke.py --device "$DEVICE"
  fi
}

if [ "$DEVICE" = none ]; then
  note "no CUDA GPU visible to $PYTHON (no torch, or torch.cuda.is_available() is False):"
  note "skipping build, backends, tests, memcheck, bench and racecheck (dry run, exit 0)"
  for s in build backends tests memcheck bench racecheck; do skip "$s" "no GPU"; done
else
  if step build 300 make build PYTHON="$PYTHON" VENV="$VENV"; then
    step backends 60 "$PY" - "$DEVICE" <<'EOF'
import sys
import regfuse
from regfuse import backends
device = sys.argv[1]
for name in backends.NAMES:
    print(f"{name}: {backends.unavailable_reason(name, device) or 'available'}")
order = regfuse.available_backends(device)
print(f"available_backends({device!r}) = {order}")
assert order[0] == device, f"the compiled {device} backend is not available"
EOF

    test_args=(-q --durations=15)
    if "$PY" -c "import xdist" 2>/dev/null; then test_args+=(-n "$TEST_WORKERS"); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then test_args+=(--timeout "$TEST_TIMEOUT_S"); fi
    # shellcheck disable=SC2086  # TESTS is a list of paths
    step tests 300 "$PY" -m pytest $TESTS "${test_args[@]}"

    sanitized_step memcheck 150
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    step bench 180 "$PY" benchmarks/run.py --device "$DEVICE" --no-plots \
      --markdown "$LOG_DIR/bench.md" $BENCH_ARGS
    sanitized_step racecheck 120
  else
    for s in backends tests memcheck bench racecheck; do skip "$s" "build failed"; done
  fi
fi

echo
{
  cat "$LOG_DIR/preflight.log"
  echo
  echo "gpu_check summary ($((SECONDS - started)) s; logs in $LOG_DIR):"
  cat "$steps"
} >"$summary"
rm -f "$LOG_DIR/preflight.log"
echo "gpu_check summary ($((SECONDS - started)) s; logs in $LOG_DIR):"
cat "$steps"
exit "$failed"
