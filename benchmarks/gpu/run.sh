#!/usr/bin/env bash
# One-shot GPU check of bigmodel on a lent machine: environment, build (sm_90 only), CUDA tests (pytest
# and ctest), compute-sanitizer (memcheck, racecheck), benchmarks against cuDNN. See README.md here.
#
#   bash benchmarks/gpu/run.sh            # results in $OUT (the device tool's), else benchmarks/gpu/results/
#
# Budget-aware: the whole run aims to end within GPU_RUN_BUDGET_S seconds (default 480). Every step runs
# under `timeout`, and a step that no longer fits is skipped with a note. SUMMARY.md is rewritten after
# every step, so a run killed from outside still leaves what it had. Nothing is fetched: pip runs offline.
# Exit status: 1 when the extension failed to build (or was built without its CUDA kernels), else 0; the
# summary says which steps failed.
#
# Knobs: GPU_RUN_BUDGET_S (seconds, default 480), GPU_RUN_ARCH (default: the GPU's compute capability,
# else 9.0), MAX_JOBS (default: nproc), CUDA_HOME (default: found), PYTHON (default: python3).

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd) || exit 1
cd "$REPO" || exit 1

OUT_DIR=${OUT:-$REPO/benchmarks/gpu/results}
mkdir -p "$OUT_DIR" || exit 1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/bigmodel-gpu.XXXXXX") || exit 1
BUDGET_S=${GPU_RUN_BUDGET_S:-480}
SUMMARY_RESERVE_S=10 # kept back at every step for the last summary
START=$(date +%s)
STARTED_AT=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

# The files that come back (the device tool returns at most 8, none in subfolders): keep to these.
SUMMARY=$OUT_DIR/SUMMARY.md
BUILD_LOG=$OUT_DIR/build.log
PYTEST_LOG=$OUT_DIR/pytest.log
CTEST_LOG=$OUT_DIR/ctest.log
SAN_LOG=$OUT_DIR/sanitizer.log
BENCH_LOG=$OUT_DIR/bench.log
BENCH_JSON=$OUT_DIR/bench.json
for f in "$BUILD_LOG" "$PYTEST_LOG" "$CTEST_LOG" "$SAN_LOG" "$BENCH_LOG"; do : >"$f"; done
rm -f "$BENCH_JSON"

CMAKE_DIR=$REPO/cmake-build-gpu # ignored by .gitignore (cmake-build*/); reused on a warm machine
CMAKE_PID=""
BUILD_OK=1
FINISHED=0

export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export BIGMODEL_CUDA=1 # a missing toolkit is an error, not a silent CPU-only build
MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MAX_JOBS

# ---------------------------------------------------------------- helpers

now() { date +%s; }
elapsed() { echo $(($(now) - START)); }
remaining() { echo $((BUDGET_S - $(elapsed))); }
log() { printf '[+%4ss] %s\n' "$(elapsed)" "$*"; }

# step_timeout WANT RESERVE: WANT seconds, or less so that RESERVE seconds (for later steps) and the
# summary's reserve remain in the budget. May print 0 or less: the caller then skips the step.
step_timeout() {
  local avail=$(($(remaining) - SUMMARY_RESERVE_S - $2))
  if ((avail < $1)); then echo "$avail"; else echo "$1"; fi
}

# run_timed LOG TIMEOUT CMD...: run CMD under `timeout`, appending its output to LOG; sets LAST_S.
run_timed() {
  local logf=$1 t=$2 t0 rc
  shift 2
  t0=$(now)
  printf '\n$ %s\n# timeout %ss, at +%ss\n' "$*" "$t" "$(elapsed)" >>"$logf"
  timeout -k 10 "$t" "$@" >>"$logf" 2>&1
  rc=$?
  LAST_S=$(($(now) - t0))
  printf '# exit %s after %ss\n' "$rc" "$LAST_S" >>"$logf"
  return "$rc"
}

timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }

# Bytes of LOG so far; `log_since LOG OFFSET` prints what was appended after.
log_size() { stat -c %s "$1" 2>/dev/null || echo 0; }
log_since() { tail -c +"$(($2 + 1))" "$1"; }

STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
STEP_NOTES=()
# record NAME RESULT SECONDS NOTE: one row of the summary table (RESULT: PASS, FAIL, SKIP).
record() {
  STEP_NAMES+=("$1")
  STEP_RESULTS+=("$2")
  STEP_TIMES+=("$3")
  STEP_NOTES+=("$(printf '%s' "$4" | tr '\n|' ' /' | cut -c1-400)")
  log "$1: $2 (${3}s) $4"
  write_summary
}

summary_steps() {
  local i failed=()
  for i in "${!STEP_NAMES[@]}"; do
    [ "${STEP_RESULTS[$i]}" = FAIL ] && failed+=("${STEP_NAMES[$i]}")
  done
  echo "# bigmodel GPU run, $STARTED_AT"
  echo
  echo "GPU: ${GPU_NAME:-unknown}; torch ${TORCH_VERSION:-?}; nvcc ${NVCC_VERSION:-?}; arch list ${TORCH_CUDA_ARCH_LIST:-?};"
  echo "commit ${COMMIT:-unknown}. Budget: $(elapsed)s used of ${BUDGET_S}s."
  echo
  if ((FINISHED == 0)); then
    echo "**Overall: INCOMPLETE** (written while the run was still going; it was stopped after the last step below)"
  elif ((BUILD_OK == 0)); then
    echo "**Overall: BUILD FAILED** (see build.log)${failed[*]:+; failed: ${failed[*]}}"
  elif ((${#failed[@]})); then
    echo "**Overall: FAIL** (failed: ${failed[*]})"
  else
    echo "**Overall: PASS** (every step that ran passed; see the table for skips)"
  fi
  echo
  echo "| step | result | seconds | note |"
  echo "|---|---|---:|---|"
  for i in "${!STEP_NAMES[@]}"; do
    echo "| ${STEP_NAMES[$i]} | ${STEP_RESULTS[$i]} | ${STEP_TIMES[$i]} | ${STEP_NOTES[$i]} |"
  done
}

summary_bench() {
  local fam
  for fam in lstm attention classifier; do
    if [ -s "$SCRATCH/bench-$fam.md" ]; then
      echo
      echo "## Benchmark: $fam, CUDA, bigmodel vs native (cuDNN / SDPA)${BENCH_QUICK[$fam]:+ (--quick)}"
      echo
      cat "$SCRATCH/bench-$fam.md"
    fi
  done
}

write_summary() {
  {
    summary_steps
    summary_bench
    if [ -s "$SCRATCH/info.txt" ]; then
      printf '\n## python -m bigmodel info\n\n```\n'
      cat "$SCRATCH/info.txt"
      printf '```\n'
    fi
    if [ -s "$SCRATCH/env.txt" ]; then
      printf '\n## Environment\n\n```\n'
      cat "$SCRATCH/env.txt"
      printf '```\n'
    fi
    printf '\n## Files\n\n'
    echo "SUMMARY.md (this), build.log (pip/setup.py build, bigmodel info), pytest.log (CUDA tests),"
    echo "ctest.log (CMake configure + build + ctest), sanitizer.log (memcheck, racecheck on"
    echo "benchmarks/gpu/sanitize_case.py, sanitize_attention.py), bench.log (bigmodel bench output), bench.json (its results)."
  } >"$SUMMARY"
}

cleanup() {
  if [ -n "$CMAKE_PID" ] && kill -0 "$CMAKE_PID" 2>/dev/null; then
    kill -TERM "$CMAKE_PID" 2>/dev/null # `timeout` passes it on to the build it runs
  fi
  rm -rf "$SCRATCH"
}
trap cleanup EXIT

declare -A BENCH_QUICK=()

# ---------------------------------------------------------------- 1. environment

log "bigmodel GPU run: budget ${BUDGET_S}s, results in $OUT_DIR"
PYBIN=$(command -v "${PYTHON:-python3}" || command -v python) || {
  echo "no python3 on PATH" >&2
  exit 1
}
# pip-installed tools (cmake, ninja, pytest) live beside the interpreter.
export PATH="$(dirname "$PYBIN"):$PATH"

find_cuda_home() {
  local c nvcc
  for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$c" ] && [ -x "$c/bin/nvcc" ]; then
      echo "$c"
      return 0
    fi
  done
  if nvcc=$(command -v nvcc); then
    dirname "$(dirname "$(readlink -f "$nvcc")")"
    return 0
  fi
  for c in /usr/local/cuda-*; do
    if [ -x "$c/bin/nvcc" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

find_sanitizer() {
  local c
  for c in "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" "${CUDA_HOME:+$CUDA_HOME/compute-sanitizer/compute-sanitizer}" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
    "$(command -v compute-sanitizer 2>/dev/null)"; do
    if [ -n "$c" ] && [ -f "$c" ] && [ -x "$c" ]; then
      echo "$c"
      return 0
    fi
  done
  c=$(find /usr/local /opt -maxdepth 5 -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1)
  [ -n "$c" ] && echo "$c"
}

t0=$(now)
if CUDA_HOME=$(find_cuda_home); then
  export CUDA_HOME
  export PATH="$CUDA_HOME/bin:$PATH"
  NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' | cut -d' ' -f2)
else
  unset CUDA_HOME
fi
SANITIZER=$(find_sanitizer)
GPU_CC=$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
[[ "$GPU_CC" =~ ^[0-9]+\.[0-9]+$ ]] || GPU_CC=""
export TORCH_CUDA_ARCH_LIST=${GPU_RUN_ARCH:-${GPU_CC:-9.0}}
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git in this copy)")

{
  echo "\$ nvidia-smi"
  timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi failed: $?)"
  echo
  echo "\$ nvidia-smi --query-gpu=... (read only)"
  timeout 30 nvidia-smi --format=csv \
    --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode 2>&1
  echo
  echo "\$ nvcc --version   (CUDA_HOME=${CUDA_HOME:-not found})"
  if [ -n "${CUDA_HOME:-}" ]; then "$CUDA_HOME/bin/nvcc" --version 2>&1; else echo "no nvcc found"; fi
  echo
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  [ -n "$SANITIZER" ] && timeout 30 "$SANITIZER" --version 2>&1 | tail -n 2
  echo
  echo "\$ $PYBIN -c 'import torch ...'"
  timeout 60 "$PYBIN" - <<'PY' 2>&1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
print("torch arch list:", torch.cuda.get_arch_list())
print("tf32 matmul:", torch.backends.cuda.matmul.allow_tf32, "| tf32 cudnn:", torch.backends.cudnn.allow_tf32)
PY
  echo
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS nproc=$(nproc) python=$PYBIN"
  echo "cmake: $(cmake --version 2>/dev/null | head -n 1 || echo none)   ninja: $(ninja --version 2>/dev/null || echo none)"
  "$PYBIN" -m pip list 2>/dev/null | grep -iE '^(torch|triton|pytest|pytest-benchmark|pytest-xdist|pytest-timeout|hypothesis|setuptools|wheel|ninja|cmake|numpy|tqdm) ' || true
  echo
  uname -a
  grep -m 1 PRETTY_NAME /etc/os-release 2>/dev/null
  grep -m 1 'model name' /proc/cpuinfo 2>/dev/null
  free -g 2>/dev/null | head -n 2
  echo "commit: $COMMIT"
} >"$SCRATCH/env.txt" 2>&1

GPU_NAME=$(timeout 30 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
TORCH_VERSION=$(sed -n 's/^python [^|]*| torch \([^ ]*\).*/\1/p' "$SCRATCH/env.txt" | head -n 1)
if grep -q '^cuda available: True' "$SCRATCH/env.txt"; then
  record env PASS $(($(now) - t0)) "GPU ${GPU_NAME:-?}, compute capability ${GPU_CC:-?}; CUDA_HOME=${CUDA_HOME:-none}; compute-sanitizer ${SANITIZER:-not found}"
else
  record env FAIL $(($(now) - t0)) "torch sees no GPU (see Environment below); CUDA steps will fail"
fi

# ---------------------------------------------------------------- 2a. CMake build, in the background

# It compiles the same sources as the Python build, so the two run side by side (16 cores); ctest runs
# after pytest.
CMAKE_T0=$(now)
if ! command -v cmake >/dev/null; then
  CMAKE_PID=""
  echo "cmake not found" >>"$CTEST_LOG"
else
  # Torch_DIR: the folder holding TorchConfig.cmake (torch/share/cmake/Torch in a pip torch).
  TORCH_DIR=$("$PYBIN" -c 'import os, torch; print(os.path.join(torch.utils.cmake_prefix_path, "Torch"))' 2>>"$CTEST_LOG")
  GENERATOR=""
  command -v ninja >/dev/null && GENERATOR=Ninja
  cm_t=$(step_timeout 360 120)
  timeout -k 10 "$cm_t" bash -c '
    dir=$1 gen=$2 torch_dir=$3 jobs=$4 py=$5 endfile=$6
    args=(-S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DBIGMODEL_CUDA=ON "-DTORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
          "-DTorch_DIR=$torch_dir" "-DPython3_EXECUTABLE=$py")
    [ -n "$gen" ] && args+=(-G "$gen")
    echo "\$ cmake ${args[*]}"
    cmake "${args[@]}" || exit $?
    echo "\$ cmake --build $dir -j $jobs"
    cmake --build "$dir" -j "$jobs" || exit $?
    date +%s >"$endfile"
  ' _ "$CMAKE_DIR" "$GENERATOR" "$TORCH_DIR" "$MAX_JOBS" "$PYBIN" "$SCRATCH/cmake.end" >>"$CTEST_LOG" 2>&1 &
  CMAKE_PID=$!
  log "CMake build started in the background (timeout ${cm_t}s, log ctest.log)"
fi

# ---------------------------------------------------------------- 2b. the Python extension

t0=$(now)
t=$(step_timeout 270 0)
build_note=""
run_timed "$BUILD_LOG" "$t" "$PYBIN" -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir -v -e .
rc=$?
if ((rc == 0)); then
  build_note="pip install -e . (offline)"
elif timed_out "$rc"; then
  build_note="pip install -e . timed out after ${t}s"
elif grep -qE 'ninja: build stopped|^FAILED: |error: command .* failed' "$BUILD_LOG"; then
  build_note="compile error in pip install -e . (see build.log)"
else
  # pip could not install offline (an externally managed Python, a missing build backend, ...):
  # build in place and put the checkout on the path instead.
  t=$(step_timeout 270 0)
  if ((t > 30)); then
    log "pip install -e . failed (exit $rc); falling back to setup.py build_ext --inplace"
    run_timed "$BUILD_LOG" "$t" "$PYBIN" setup.py build_ext --inplace
    rc=$?
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    build_note="pip install -e . failed; setup.py build_ext --inplace exit $rc"
  fi
fi
if ((rc == 0)); then
  (cd "$SCRATCH" && timeout 90 "$PYBIN" -m bigmodel info) >"$SCRATCH/info.txt" 2>&1
  irc=$?
  {
    printf '\n$ python -m bigmodel info   (exit %s)\n' "$irc"
    cat "$SCRATCH/info.txt"
  } >>"$BUILD_LOG"
  missing=()
  grep -q 'compiled for CUDA: .*sm_' "$SCRATCH/info.txt" || missing+=("no CUDA archs compiled in")
  grep -Eq '^ +lstm_layer +.*CUDA' "$SCRATCH/info.txt" || missing+=("lstm_layer has no CUDA kernel")
  grep -Eq '^ +lstm_layer_backward +.*CUDA' "$SCRATCH/info.txt" || missing+=("lstm_layer_backward has no CUDA kernel")
  grep -Eq '^ +attention +.*CUDA' "$SCRATCH/info.txt" || missing+=("attention has no CUDA kernel")
  grep -Eq '^ +attention_backward +.*CUDA' "$SCRATCH/info.txt" || missing+=("attention_backward has no CUDA kernel")
  grep -q '^GPU: none visible' "$SCRATCH/info.txt" && missing+=("bigmodel info sees no GPU")
  ((irc == 0)) || missing+=("bigmodel info exit $irc")
  if ((${#missing[@]})); then
    BUILD_OK=0
    record build FAIL $(($(now) - t0)) "$build_note; $(
      IFS=';'
      echo "${missing[*]}"
    )"
  else
    record build PASS $(($(now) - t0)) "$build_note; bigmodel info: $(grep 'compiled for CUDA' "$SCRATCH/info.txt"), lstm ops have CUDA kernels"
  fi
else
  BUILD_OK=0
  record build FAIL $(($(now) - t0)) "${build_note:-pip install -e . exit $rc}; the Python steps are skipped"
fi

# ---------------------------------------------------------------- 3a. CUDA tests (pytest)

# tests/conftest.py parametrizes the `device` fixture as "cpu" / "cuda", so the CUDA cases are the items
# whose id holds "cuda" (test_x[cuda-...]); test_cuda_missing_is_a_clear_error is a no-GPU test.
if ((BUILD_OK == 0)); then
  record pytest-cuda SKIP 0 "the build failed"
else
  t=$(step_timeout 180 150)
  if ((t < 40)); then
    record pytest-cuda SKIP 0 "budget: $(remaining)s left of ${BUDGET_S}s, part kept for later steps"
  else
    args=(-m pytest tests -q -p no:cacheprovider -k "cuda and not cuda_missing" --maxfail=10 -rfEs)
    xdist=""
    if "$PYBIN" -c 'import xdist' 2>/dev/null; then
      args+=(-n 4)
      xdist=", 4 xdist workers"
    fi
    "$PYBIN" -c 'import pytest_timeout' 2>/dev/null && args+=(--timeout=120)
    run_timed "$PYTEST_LOG" "$t" "$PYBIN" "${args[@]}"
    rc=$?
    line=$(grep -E '[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$PYTEST_LOG" | tail -n 1 | tr -d '=' | sed 's/^ *//')
    passed=$(printf '%s' "$line" | grep -Eo '[0-9]+ passed' | grep -Eo '[0-9]+' || echo 0)
    if timed_out "$rc"; then
      record pytest-cuda FAIL "$LAST_S" "timed out after ${t}s; last: $line"
    elif ((rc == 5)); then
      record pytest-cuda FAIL "$LAST_S" "no CUDA tests collected (exit 5)"
    elif grep -qE 'CUDA is not available|built without its CUDA kernels' "$PYTEST_LOG"; then
      record pytest-cuda FAIL "$LAST_S" "CUDA tests were skipped ($(grep -Eom1 'CUDA is not available|built without its CUDA kernels' "$PYTEST_LOG")); $line"
    elif ((rc != 0)); then
      record pytest-cuda FAIL "$LAST_S" "exit $rc: $line; first failures: $(grep -E '^(FAILED|ERROR) ' "$PYTEST_LOG" | head -n 3 | cut -c1-120 | tr '\n' ' ')"
    elif ((passed == 0)); then
      record pytest-cuda FAIL "$LAST_S" "nothing passed: $line"
    else
      record pytest-cuda PASS "$LAST_S" "$line$xdist"
    fi
  fi
fi

# ---------------------------------------------------------------- 3b. CMake build + ctest

if [ -z "$CMAKE_PID" ]; then
  record cmake-build FAIL 0 "cmake not found"
  record ctest SKIP 0 "no CMake build"
else
  wait "$CMAKE_PID"
  crc=$?
  CMAKE_PID=""
  end=$(cat "$SCRATCH/cmake.end" 2>/dev/null || now)
  cmake_s=$((end - CMAKE_T0))
  if timed_out "$crc"; then
    record cmake-build FAIL "$cmake_s" "timed out (background build, alongside the Python build)"
  elif ((crc != 0)); then
    record cmake-build FAIL "$cmake_s" "exit $crc: $(grep -Em2 'error|Error' "$CTEST_LOG" | cut -c1-160 | tr '\n' ' ')"
  else
    record cmake-build PASS "$cmake_s" "configure + build in the background (${GENERATOR:-Makefiles})"
  fi
  if ((crc == 0)); then
    t=$(step_timeout 120 120)
    if ((t < 20)); then
      record ctest SKIP 0 "budget: $(remaining)s left of ${BUDGET_S}s, part kept for later steps"
    else
      off=$(log_size "$CTEST_LOG")
      run_timed "$CTEST_LOG" "$t" ctest --test-dir "$CMAKE_DIR" -V --timeout "$t"
      rc=$?
      line=$(log_since "$CTEST_LOG" "$off" | grep -Eo 'test_lstm: [0-9]+ cases on [a-z ]+, [0-9]+ failed checks' | tail -n 1)
      if timed_out "$rc"; then
        record ctest FAIL "$LAST_S" "timed out after ${t}s"
      elif ((rc != 0)); then
        record ctest FAIL "$LAST_S" "exit $rc: ${line:-no test_lstm summary}; $(log_since "$CTEST_LOG" "$off" | grep -m3 '^.*FAIL ' | cut -c1-160 | tr '\n' ' ')"
      elif [[ "$line" != *"cpu and cuda"* ]]; then
        record ctest FAIL "$LAST_S" "test_lstm did not run its CUDA cases: ${line:-no test_lstm summary}"
      else
        record ctest PASS "$LAST_S" "$line"
      fi
    fi
  else
    record ctest SKIP 0 "the CMake build failed"
  fi
fi

# ---------------------------------------------------------------- 4. compute-sanitizer

# memcheck: out-of-bounds and misaligned accesses (no caching allocator, so a block's end is the
# tensor's end). racecheck: shared-memory hazards. API errors are not reported: PyTorch's own probing
# calls produce some; an error our code causes fails the case script instead.
for tool in memcheck racecheck; do
  if ((BUILD_OK == 0)); then
    record "$tool" SKIP 0 "the build failed"
    continue
  fi
  if [ -z "$SANITIZER" ]; then
    record "$tool" FAIL 0 "compute-sanitizer not found (looked in \$CUDA_HOME/bin, /usr/local/cuda, PATH, /opt)"
    continue
  fi
  t=$(step_timeout 120 90)
  if ((t < 30)); then
    record "$tool" SKIP 0 "budget: $(remaining)s left of ${BUDGET_S}s, part kept for later steps"
    continue
  fi
  off=$(log_size "$SAN_LOG")
  printf '\n########## %s\n' "$tool" >>"$SAN_LOG"
  run_timed "$SAN_LOG" "$t" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 86 --report-api-errors no --target-processes all bash -c \
    '"$1" benchmarks/gpu/sanitize_case.py; a=$?; "$1" benchmarks/gpu/sanitize_attention.py; b=$?; exit $((a > b ? a : b))' \
    sanitize "$PYBIN"
  rc=$?
  section=$(log_since "$SAN_LOG" "$off")
  errors=$(printf '%s\n' "$section" | grep -Eo 'ERROR SUMMARY: [0-9]+ error' | grep -Eo '[0-9]+' | tail -n 1)
  if [ -z "$errors" ]; then
    errors=$(printf '%s\n' "$section" | grep -Eo 'RACECHECK SUMMARY: .*\([0-9]+ error' | grep -Eo '\([0-9]+' | tr -d '(' | tail -n 1)
  fi
  ours=$(printf '%s\n' "$section" | grep -c 'bigmodel::' || true)
  case_line=$(printf '%s\n' "$section" | grep -E '^sanitize_(case|attention): (OK|FAILED)' | tr '\n' ' ')
  ((rc == 0)) && [ "$(printf '%s\n' "$section" | grep -cE '^sanitize_(case|attention): OK')" -ne 2 ] && rc=1
  if timed_out "$rc"; then
    record "$tool" FAIL "$LAST_S" "timed out after ${t}s"
  elif [ -z "$errors" ]; then
    record "$tool" FAIL "$LAST_S" "exit $rc, no sanitizer summary: $(printf '%s\n' "$section" | grep -m2 -iE 'error|not supported' | cut -c1-160 | tr '\n' ' ')"
  elif ((errors > 0)); then
    record "$tool" FAIL "$LAST_S" "$errors errors reported ($ours report lines name bigmodel:: kernels); exit $rc"
  elif ((rc != 0)) || [ -z "$case_line" ]; then
    record "$tool" FAIL "$LAST_S" "0 sanitizer errors, but the case script failed (exit $rc): ${case_line:-no OK line}"
  else
    record "$tool" PASS "$LAST_S" "0 errors; $case_line"
  fi
done

# ---------------------------------------------------------------- 5. benchmarks against cuDNN and SDPA

merge_bench_json() {
  local files=() fam
  for fam in lstm attention classifier; do
    [ -s "$SCRATCH/bench-$fam.json" ] && files+=("$SCRATCH/bench-$fam.json")
  done
  ((${#files[@]})) || return 0
  "$PYBIN" - "$BENCH_JSON" "${files[@]}" <<'PY'
import json, pathlib, sys
merged = {pathlib.Path(p).stem.removeprefix("bench-"): json.loads(pathlib.Path(p).read_text()) for p in sys.argv[2:]}
pathlib.Path(sys.argv[1]).write_text(json.dumps(merged, indent=2) + "\n")
PY
}

# bench FAMILY WANT_FULL WANT_QUICK MIN: full run if WANT_FULL seconds fit, else --quick, else skip.
bench() {
  local fam=$1 full=$2 quick=$3 min=$4 t rc off why
  local -a extra=()
  if ((BUILD_OK == 0)); then
    record "bench-$fam" SKIP 0 "the build failed"
    return
  fi
  t=$(step_timeout "$full" 0)
  if ((t < full)); then
    extra=(--quick)
    BENCH_QUICK[$fam]=1
    ((t > quick)) && t=$quick
  fi
  if ((t < min)); then
    record "bench-$fam" SKIP 0 "budget: $(remaining)s left of ${BUDGET_S}s, part kept for later steps"
    return
  fi
  off=$(log_size "$BENCH_LOG")
  run_timed "$BENCH_LOG" "$t" "$PYBIN" -m bigmodel bench --ops "$fam" --device cuda --baseline default \
    --json "$SCRATCH/bench-$fam.json" --markdown "$SCRATCH/bench-$fam.md" "${extra[@]}"
  rc=$?
  merge_bench_json
  if timed_out "$rc"; then
    record "bench-$fam" FAIL "$LAST_S" "timed out after ${t}s${extra[*]:+ (--quick)}"
  elif ((rc != 0)) || [ ! -s "$SCRATCH/bench-$fam.md" ]; then
    why=$(log_since "$BENCH_LOG" "$off" | grep -E '^bigmodel bench:|Error' | tail -n 2)
    [ -n "$why" ] || why=$(log_since "$BENCH_LOG" "$off" | grep -vE '^(# |\$ )' | grep . | tail -n 2)
    record "bench-$fam" FAIL "$LAST_S" "exit $rc: $(printf '%s\n' "$why" | cut -c1-200 | tr '\n' ' ')"
  else
    record "bench-$fam" PASS "$LAST_S" "$(($(grep -c '^| ' "$SCRATCH/bench-$fam.md") - 1)) table rows${extra[*]:+, --quick}; table below"
  fi
}

bench lstm 150 90 40
bench attention 120 60 40
bench classifier 90 60 40

# ---------------------------------------------------------------- 6. summary

FINISHED=1
write_summary
echo
summary_steps
summary_bench
echo
echo "Full summary and logs: $OUT_DIR"
((BUILD_OK == 1)) || exit 1
exit 0
