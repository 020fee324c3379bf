#!/usr/bin/env bash
# Proves, without a GPU, that the CUDA sources of ptp_ext compile for sm_80 (A100) and sm_90a
# (H100/H200) and that the CUDA build registers every op for the CUDA dispatch key.
#
#   1. fast gate: each torch-free csrc/*/*_kernels.cuh alone, in a tiny TU, with plain nvcc;
#   2. the full extension (setup.py, PTP_WITH_CUDA=1) against a CUDA torch (2.14.1 + CUDA 13.0)
#      in its own venv (cached under ~/.cache/ptp-ci/venv-cuda), built into a temporary directory
#      so the CPU build in the work tree is untouched;
#   3. import it: ptp_ext.with_cuda() and a CUDA kernel for every ptp_ext op;
#   4. cuobjdump --list-elf: sm_80 and sm_90a cubins in every CUDA object and in the .so.
#
# Environment: CUDA_HOME (default /usr/local/cuda), PTP_CUDA_VENV, PTP_CUDA_TORCH (torch==2.14.1),
# MAX_JOBS (2), PTP_KEEP_BUILD=1 keeps the temporary build directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
VENV="${PTP_CUDA_VENV:-$HOME/.cache/ptp-ci/venv-cuda}"
TORCH_PIN="${PTP_CUDA_TORCH:-torch==2.14.1}"
ARCHS=(80 90a)
export MAX_JOBS="${MAX_JOBS:-2}"

die() { echo "cuda_compile_check: FAILED: $*" >&2; exit 1; }
step() { echo; echo "== $* ($(date +%H:%M:%S))"; }

NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc || true)"
[ -n "$NVCC" ] && [ -x "$NVCC" ] || die "nvcc not found (CUDA_HOME=$CUDA_HOME): the CUDA compile check needs the CUDA toolkit"
"$NVCC" --version | tail -1

mapfile -t CUH < <(ls csrc/*/*_kernels.cuh 2>/dev/null || true)
mapfile -t CU < <(ls csrc/*/*_cuda.cu 2>/dev/null || true)
[ "${#CU[@]}" -gt 0 ] || die "no csrc/*/*_cuda.cu source found: nothing would prove the CUDA path"
GENCODE=()
for a in "${ARCHS[@]}"; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done

WORK="$(mktemp -d /tmp/ptp-cuda-check.XXXXXX)"
if [ "${PTP_KEEP_BUILD:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi

# ---- 1. torch-free kernel headers with plain nvcc ----------------------------------------------
step "1/4 nvcc alone on each *_kernels.cuh (${#CUH[@]} headers), sm_${ARCHS[*]}"
[ "${#CUH[@]}" -gt 0 ] || echo "WARNING: no csrc/*/*_kernels.cuh found (STYLE.md wants torch-free kernel headers)"
for h in "${CUH[@]}"; do
  tu="$WORK/$(basename "$h" .cuh)_tu.cu"
  printf '#include "%s"\n' "$ROOT/$h" > "$tu"
  t0=$(date +%s)
  "$NVCC" -std=c++17 --expt-relaxed-constexpr -O2 -I "$ROOT/csrc" "${GENCODE[@]}" \
    -c "$tu" -o "$WORK/$(basename "$h" .cuh).o" || die "$h does not compile alone with nvcc"
  echo "ok  $h ($(( $(date +%s) - t0 )) s)"
done

# ---- 2. the CUDA venv and the full extension ----------------------------------------------------
step "2/4 CUDA torch venv ($VENV)"
STAMP="$VENV/.ptp-cuda-venv-stamp"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$TORCH_PIN" ]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  # torch pinned in the same call as everything else (never an unpinned, newer torch). The
  # filter drops pip's "Location ... is ignored" noise about this machine's local indexes.
  { "$VENV/bin/python" -m pip install -q -U pip 2>&1
    "$VENV/bin/python" -m pip install -q "$TORCH_PIN" numpy ninja setuptools wheel pybind11 2>&1
  } | { grep -v 'is ignored: it is neither' || true; }
  "$VENV/bin/python" -c 'import torch' || die "could not install $TORCH_PIN into $VENV"
  echo "$TORCH_PIN" > "$STAMP"
else
  echo "reusing $VENV ($(cat "$STAMP"))"
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'

step "3/4 setup.py build_ext, PTP_WITH_CUDA=1, TORCH_CUDA_ARCH_LIST=8.0;9.0a, ${#CU[@]} .cu files"
t0=$(date +%s)
# Build from a copy: setup.py's build_ext writes nothing else, but a copy also keeps egg-info and
# ninja files away from the work tree.
mkdir -p "$WORK/src"
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' -cf - . \
  | tar -C "$WORK/src" -xf -
LOG="${PTP_CUDA_BUILD_LOG:-$HOME/.cache/ptp-ci/cuda-build.log}"
mkdir -p "$(dirname "$LOG")"
if ! (
  cd "$WORK/src"
  PATH="$VENV/bin:$PATH" CFLAGS="-g0" TORCH_CUDA_ARCH_LIST="8.0;9.0a" PTP_WITH_CUDA=1 \
    "$PY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/obj" -j "$MAX_JOBS"
) >"$LOG" 2>&1; then
  tail -n 80 "$LOG"
  die "the CUDA build of ptp_ext failed (full log: $LOG)"
fi
grep -E 'warning|remark' "$LOG" | grep -v -E 'No CUDA runtime is found' | head -n 30 || true
cp ptp_ext/*.py "$WORK/lib/ptp_ext/"
SO="$(ls "$WORK"/lib/ptp_ext/_C*.so)"
echo "built $SO in $(( $(date +%s) - t0 )) s (log: $LOG)"

step "4/4 import, CUDA dispatch keys, cubins"
# No GPU here: importing and querying the dispatcher needs none.
(cd "$WORK" && PYTHONPATH="$WORK/lib" "$PY" - <<'PYEOF'
import torch
import ptp_ext

assert ptp_ext.with_cuda(), "ptp_ext.with_cuda() is False in the CUDA build"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ptp_ext::"))
assert ops, "no ptp_ext op registered"
# CPU-only by design (no CUDA implementation; see csrc/registration.cpp)
CPU_ONLY = {"ptp_ext::decode_step"}
# ops without a tensor argument have one CompositeExplicitAutograd kernel for every backend
COMPOSITE = {n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CompositeExplicitAutograd")}
missing = [n for n in ops if n not in CPU_ONLY and n not in COMPOSITE
           and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print("with_cuda() = True; CUDA kernels registered for:",
      ", ".join(n for n in ops if n not in CPU_ONLY), "| CPU-only:", ", ".join(sorted(CPU_ONLY)))
PYEOF
) || die "the CUDA build does not register its CUDA kernels"

CUOBJDUMP=""
for c in "$(command -v cuobjdump || true)" "$CUDA_HOME/bin/cuobjdump" \
         "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then CUOBJDUMP="$c"; break; fi
done
if [ -z "$CUOBJDUMP" ]; then
  "$PY" -m pip install -q nvidia-cuda-cuobjdump || true
  CUOBJDUMP="$(find "$VENV" -name cuobjdump -type f -perm -u+x | head -1)"
fi
[ -n "$CUOBJDUMP" ] || die "cuobjdump not found (nor in triton, nor via pip nvidia-cuda-cuobjdump)"

check_elf() {  # file label
  local listing
  listing="$("$CUOBJDUMP" --list-elf "$1" 2>&1)" || die "cuobjdump failed on $2: $listing"
  for a in "${ARCHS[@]}"; do
    grep -q "sm_${a}\b" <<<"$listing" || { echo "$listing"; die "$2 holds no sm_${a} cubin"; }
  done
  echo "ok  $2: $(grep -o 'sm_[0-9a-z]*' <<<"$listing" | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
}
for cu in "${CU[@]}"; do
  obj="$(find "$WORK/obj" -name "$(basename "$cu" .cu)*.o" | head -1)"
  [ -n "$obj" ] || die "no object file for $cu"
  check_elf "$obj" "$cu"
done
check_elf "$SO" "$(basename "$SO")"
echo
echo "cuda_compile_check: OK (${#CUH[@]} kernel headers, ${#CU[@]} .cu files, sm_80 + sm_90a)"
