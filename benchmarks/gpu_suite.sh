#!/usr/bin/env bash
# Build, test and benchmark padst_ext on a GPU machine, in one call, from the repository root:
#
#     bash benchmarks/gpu_suite.sh
#
# 1. environment (GPU, nvcc, python, torch)
# 2. build from source against the machine's own torch (PADST_WITH_CUDA=ON, PADST_CUDA_ARCHS default 90a)
# 3. the CUDA tests: pytest -k "(cuda or semi_structured or sass) and not emulation" (the CUDA params of tests/cases.py
#    have the id "cuda"; test_cuda_emulation.py is host-only and left to the CPU suite). The recipe tests among them
#    need timm and transformers in the python that runs this (pip install -e ".[recipes]" or the wheels offline)
# 4. compute-sanitizer (racecheck, synccheck, memcheck; 40 s each at most) on benchmarks/v2_sanitize.py: small calls
#    of the v2 block kernels, whose memory ordering (cp.async waits, barriers) the host emulation cannot check;
#    skipped when the tool is missing
# 5. benchmarks/gpu_ops.py (JSON + markdown table)
# 6. a short summary, printed LAST: GPU, build, test counts, sanitizer results, the benchmark table
#
# Logs and results go to $OUT when it is set (build.log, tests.log, bench.log, gpu_ops.json, gpu_ops.md), else logs
# to a temporary folder and results to benchmarks/results/. The whole script keeps within SUITE_BUDGET_S seconds
# (default 560): each stage runs under `timeout`, the later ones with what is left. No network is needed.
# Environment knobs: OUT, SUITE_BUDGET_S, PYTHON (default python3), PADST_CUDA_ARCHS (default 90a),
# BENCH_ARGS (extra arguments for gpu_ops.py, e.g. "--quick" or "--cases bf16").
# Exit status: 1 if the build or the tests failed (or timed out), else 0; benchmark trouble is reported, not fatal.

set -uo pipefail
export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.." || exit 1

T0=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-560}
PY=${PYTHON:-python3}
LOG=${OUT:-$(mktemp -d /tmp/padst_gpu_suite.XXXXXX)}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$LOG" "$RESULTS"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
stamp() { echo "=== [$(($(date +%s) - T0)) s] $*"; }

# ---------------------------------------------------------------------------------------------------------------
stamp "environment (logs in $LOG)"
nvidia-smi -L 2>&1 || echo "nvidia-smi failed"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
nvcc --version 2>&1 | tail -2 || echo "nvcc not found"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], sys.executable, '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| cuda available:', torch.cuda.is_available())" 2>&1
echo "cpus: $(nproc)"

# ---------------------------------------------------------------------------------------------------------------
stamp "build (log: $LOG/build.log)"
PIP_ARGS=(--no-build-isolation --no-deps --no-index -v)
IN_VENV=$("$PY" -c "import sys; print(int(sys.prefix != sys.base_prefix))")
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ "$IN_VENV" != 1 ] || [ ! -w "$SITE" ]; then
  # a system python (externally managed) or a read-only venv: install into a throwaway folder instead
  TARGET=$(mktemp -d /tmp/padst_site.XXXXXX)
  PIP_ARGS+=(--target "$TARGET")
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
  echo "installing into $TARGET (venv: $IN_VENV, $SITE writable: $([ -w "$SITE" ] && echo yes || echo no))"
fi
B0=$(date +%s)
PADST_WITH_CUDA=ON PADST_CUDA_ARCHS=${PADST_CUDA_ARCHS:-90a} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  timeout -k 10 300 "$PY" -m pip install "${PIP_ARGS[@]}" . >"$LOG/build.log" 2>&1
BUILD_RC=$?
BUILD_S=$(($(date +%s) - B0))
if [ $BUILD_RC -eq 0 ]; then
  # import from outside the source tree so that the installed package is what gets loaded
  (cd /tmp && "$PY" -c "
import torch, padst_ext
from padst_ext import _extension
ops = ['block_mm', 'block_mm_t', 'block_sddmm', 'nm_mm', 'nm_mm_t', 'nm_sddmm', 'diag_mm', 'diag_mm_t', 'diag_sddmm',
       'dense_grad']
print('padst_ext', padst_ext.__file__)
print('build info:', _extension.build_info())
print('CUDA kernels:', [o for o in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f'padst::{o}', 'CUDA')])
try:
    from padst_ext import semi_structured
    print('semi_structured.is_available():', semi_structured.is_available())
except Exception as e:
    print('semi_structured: n/a', type(e).__name__, e)
") 2>&1 | tee -a "$LOG/build.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || BUILD_RC=99 # built but does not import
  BUILD_STATUS="ok"
  [ $BUILD_RC -eq 0 ] || BUILD_STATUS="FAILED (built, but import padst_ext failed)"
else
  BUILD_STATUS="FAILED (rc $BUILD_RC$([ $BUILD_RC -eq 124 ] && echo ', timed out'))"
  echo "--- build log tail"
  tail -n 40 "$LOG/build.log"
fi
stamp "build $BUILD_STATUS in ${BUILD_S} s"

# ---------------------------------------------------------------------------------------------------------------
TESTS_RC=-1
TESTS_LINE="not run (build failed)"
if [ $BUILD_RC -eq 0 ]; then
  BENCH_MIN=150 # seconds kept for the benchmark
  SAN_MAX=120   # and for the sanitizer runs (3 x 40 s at most)
  TEST_T=$(($(left) - BENCH_MIN - SAN_MAX))
  [ $TEST_T -gt 240 ] && TEST_T=240
  [ $TEST_T -lt 30 ] && TEST_T=30
  stamp "CUDA tests, timeout ${TEST_T} s (log: $LOG/tests.log)"
  # --maxfail rather than -x: on a rare GPU session the number and kinds of failures are worth more than the first
  # test_cuda_emulation.py runs the CUDA code on the host (slow, no GPU needed): the CPU suite covers it
  timeout -k 10 "$TEST_T" "$PY" -m pytest -q tests -k "(cuda or semi_structured or sass) and not emulation" \
    -p no:cacheprovider --maxfail=20 -rfE --durations=8 >"$LOG/tests.log" 2>&1
  TESTS_RC=$?
  TESTS_LINE=$(grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)" "$LOG/tests.log" | tail -n 1)
  [ -n "$TESTS_LINE" ] || TESTS_LINE="no pytest summary line"
  [ $TESTS_RC -eq 124 ] && TESTS_LINE="TIMED OUT after ${TEST_T} s; $TESTS_LINE"
  [ $TESTS_RC -ne 0 ] && { echo "--- test failures"; grep -E "^(FAILED|ERROR)" "$LOG/tests.log" | head -n 30; }
  stamp "tests rc $TESTS_RC: $TESTS_LINE"
fi

# ---------------------------------------------------------------------------------------------------------------
SAN_LINE="not run"
if [ $BUILD_RC -eq 0 ]; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    SAN_LINE=""
    for tool in racecheck synccheck memcheck; do
      stamp "compute-sanitizer --tool $tool on the v2 kernels (log: $LOG/sanitize_$tool.log)"
      (cd /tmp && timeout -k 5 40 compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" \
        "$OLDPWD/benchmarks/v2_sanitize.py") >"$LOG/sanitize_$tool.log" 2>&1
      rc=$?
      tail -n 3 "$LOG/sanitize_$tool.log"
      SAN_LINE="$SAN_LINE $tool rc $rc$([ $rc -eq 124 ] && echo ' (timed out)');"
    done
  else
    SAN_LINE="compute-sanitizer not found"
  fi
fi

# ---------------------------------------------------------------------------------------------------------------
BENCH_RC=-1
if [ $BUILD_RC -eq 0 ]; then
  BENCH_T=$(($(left) - 15))
  [ $BENCH_T -lt 30 ] && BENCH_T=30
  BENCH_BUDGET=$((BENCH_T - 70)) # no new case after this: the last case, the JSON and the table must still fit
  [ $BENCH_BUDGET -lt 10 ] && BENCH_BUDGET=10
  stamp "benchmark, timeout ${BENCH_T} s, case budget ${BENCH_BUDGET} s (log: $LOG/bench.log)"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of words on purpose
  timeout -k 10 "$BENCH_T" "$PY" benchmarks/gpu_ops.py --out "$RESULTS/gpu_ops.json" --budget "$BENCH_BUDGET" \
    ${BENCH_ARGS:-} 2>&1 | tee "$LOG/bench.log"
  BENCH_RC=${PIPESTATUS[0]}
  [ -f "$RESULTS/gpu_ops.md" ] && [ "$RESULTS" != "$LOG" ] && cp "$RESULTS/gpu_ops.md" "$LOG/"
fi

# ---------------------------------------------------------------------------------------------------------------
echo
stamp "SUMMARY"
echo "GPU:    ${GPU:-unknown}"
echo "build:  $BUILD_STATUS, ${BUILD_S} s"
echo "tests:  rc $TESTS_RC: $TESTS_LINE"
echo "sanitizer (v2 kernels):$SAN_LINE"
echo "bench:  rc $BENCH_RC$([ "$BENCH_RC" = 124 ] && echo ' (timed out)'), results in $RESULTS/gpu_ops.json and .md"
if [ -f "$LOG/bench.log" ]; then
  if grep -q "^padst_ext CUDA ops on" "$LOG/bench.log"; then
    sed -n '/^padst_ext CUDA ops on/,$p' "$LOG/bench.log"
  else
    echo "--- no benchmark table; bench log tail:"
    tail -n 30 "$LOG/bench.log"
  fi
fi
[ $BUILD_RC -eq 0 ] && [ $TESTS_RC -eq 0 ] && exit 0
exit 1
