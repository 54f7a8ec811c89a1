#!/usr/bin/env bash
# DDP's own cost on one GPU in one go, on a CUDA machine without network (../shared/gpu/README.md
# says how kdl runs on such a machine): the acceptance of a one-GPU DDP run (world size 1 through
# torchrun) within 3 % of the plain run's throughput.
#   ddp_step.json   bench/ddp_step.py: one step through each DDP setting and kdl's own wrapper
#                   against the bare model, in one process (where a difference comes from)
#   ddp.json        bench/ddp.py: whole `kdl train` runs, plain against --nproc-per-node 1
# into $OUT (default: a new temporary folder). Dry run on a CPU, small and quick:
#   DEVICE=cpu PYTHON=.venv/bin/python STEP_ARGS="--cases digits_cnn_64 --steps 20 --rounds 1" \
#   DDP_ARGS="--config configs/digits_cnn.yaml --variants 64:fp32 --rounds 1 --epochs 2" bench/gpu_ddp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1  # as torchrun sets for its workers, for both sides
{ nvidia-smi || true; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } >"$OUT/machine.txt" 2>&1
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
timeout 240 "$PYTHON" bench/ddp_step.py --device "$DEVICE" --variants plain,ddp,ddp_view,ddp_view_nobuf,kdl \
  --out "$OUT/ddp_step.json" ${STEP_ARGS:-} 2>&1 | tee "$OUT/ddp_step.txt"
# shellcheck disable=SC2086
timeout 300 "$PYTHON" bench/ddp.py --device "$DEVICE" --rounds 2 --out "$OUT/ddp.json" ${DDP_ARGS:-} 2>&1 \
  | tee "$OUT/ddp.txt"
echo "results in $OUT"
