#!/usr/bin/env bash
# On one GPU (H100/H200): the gpu_check suite, each configuration in its own process:
#   1b (4 x 2048): stock transformers, full node, SPES node (4 of 16 experts), the last two also
#   with the memory options (lean loss, activation checkpointing, 8-bit AdamW if installed);
#   7b (2 x 2048): full node and SPES node (8 of 32), with and without the memory options.
# Prints a table and the ratios, writes benchmarks/gpu.json ($OUT/gpu.json when OUT is set), row by row.
# Needs torch + transformers only; about 5-8 minutes on an H200.
#   scripts/gpu_check.sh [more scripts/gpu_check.py options, e.g. --steps 5 --compile]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
"$PY" scripts/gpu_check.py --suite --steps 8 --warmup 2 --timeout 120 --out "${OUT:-benchmarks}/gpu.json" "$@"
