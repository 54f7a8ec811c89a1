#!/usr/bin/env bash
# Every GPU figure of kdl's speed work in one go, on a CUDA machine without network (see the
# README's Performance section; ../shared/gpu/README.md says how kdl runs on such a machine).
# Writes synthetic CIFAR-10 in the real file format (no download), then:
#   gpu.json          bench/gpu.py: seed CNN and cifar_speedrun in fp32, bf16, bf16 + channels
#                     last, + torch.compile: epoch times, samples/s, peak memory
#   overhead_*.txt    bench/overhead.py seed_cnn: kdl vs a plain loop, batch 64 fp32, 512 bf16
#   data_path.txt     bench/data_path.py: resident vs streamed batches
# into $OUT (default: a new temporary folder). Dry run on a CPU, small and quick:
#   DEVICE=cpu PYTHON=.venv/bin/python GPU_ARGS="--per-batch 300 --epochs 2 --variants fp32,bf16" \
#   OVERHEAD_ARGS="--steps 20 --rounds 1" DATA_ARGS="--rounds 1" bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
{ nvidia-smi || true; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } >"$OUT/machine.txt" 2>&1
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
"$PYTHON" bench/gpu.py --device "$DEVICE" --out "$OUT/gpu.json" ${GPU_ARGS:-} | tee "$OUT/gpu.txt"
for run in "64 fp32" "512 bf16"; do
  set -- $run
  "$PYTHON" bench/overhead.py --case seed_cnn --device "$DEVICE" --batch-size "$1" --precision "$2" \
    ${OVERHEAD_ARGS:-} | tee "$OUT/overhead_seed_cnn_b$1_$2.txt"
done
"$PYTHON" bench/data_path.py --device "$DEVICE" --workers 0,4 ${DATA_ARGS:-} | tee "$OUT/data_path.txt"
echo "results in $OUT"
