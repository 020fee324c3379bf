#!/usr/bin/env bash
# Save the FlashInfer wheels a lent GPU machine needs (it has no network) into .whl/ (git-ignored):
# flashinfer-python 0.5.3 (pure Python + JIT sources, 7 MB) and apache-tvm-ffi (cp312, 3 MB). Its
# other requirements (click, einops, ninja, numpy, nvidia-ml-py, packaging, requests, tabulate,
# tqdm, torch) are on the device image. Carry ".whl" with the device call; benchmarks/gpu_check.sh
# installs them into a scratch directory and runs benchmarks/bench_flashinfer.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "flashinfer-python==0.5.3" "apache-tvm-ffi==0.1.15.post2"
ls -la .whl
