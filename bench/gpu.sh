#!/usr/bin/env bash
# Every GPU figure of kdl's speed work in one go, on a CUDA machine without network (see the
# README's Performance section; ../shared/gpu/README.md says how kdl runs on such a machine).
# Writes synthetic CIFAR-10 in the real file format (no download), then, by PARTS (default: speed,ddp):
#   speed: gpu.json   bench/gpu.py: seed CNN and cifar_speedrun in fp32, bf16, bf16 + channels
#                     last, + torch.compile: epoch times, samples/s, peak memory
#          overhead_*.txt  bench/overhead.py seed_cnn: kdl vs a plain loop, batch 64 fp32, 512 bf16
#          data_path.txt   bench/data_path.py: resident vs streamed batches
#   ddp:   ddp_step.json  bench/ddp_step.py: one step through each DDP setting and kdl's own
#                     wrapper over one process against the bare model (where a cost comes from)
#          ddp.json   bench/ddp.py: whole `kdl train` runs, plain against --nproc-per-node 1
#                     (the one-GPU DDP run's throughput against the plain run's; both with
#                     torch's default threads, as users run them: DDP_ARGS="--threads 1" pins them)
#   sweep: sweep.txt  a sweep's two points, forked from its server (karpathy_runner/batch/forks.py),
#                     train on the GPU: whether the server serves on a CUDA machine, the sweep's
#                     lines and each point's device (at most 2 minutes)
#   ddp_runs: whole runs only, both in one lease (at most 9 minutes): ddp_profile.txt, one round
#             of batch 64 fp32 under cProfile (profiles/: the functions whose time per step grew;
#             more options in PROFILE_ARGS), then ddp_rounds.json, 3 rounds of both variants for
#             the ratios by both figures (more options in DDP_ARGS)
# into $OUT (default: a new temporary folder). Dry run on a CPU, small and quick:
#   DEVICE=cpu PYTHON=.venv/bin/python GPU_ARGS="--per-batch 300 --epochs 2 --variants fp32,bf16" \
#   OVERHEAD_ARGS="--steps 20 --rounds 1" DATA_ARGS="--rounds 1" \
#   STEP_ARGS="--cases digits_cnn_64 --steps 20 --rounds 1" \
#   DDP_ARGS="--config configs/digits_cnn.yaml --variants 64:fp32 --rounds 1 --epochs 2" bench/gpu.sh
# PARTS=ddp bench/gpu.sh measures DDP's cost alone (at most 9 minutes: its two benches have timeouts).
# With DDP_ARGS="--rounds 1 --profile $OUT/profiles" its whole runs train under cProfile instead, and
# bench/ddp.py prints the functions whose time per step grew from the plain run to the worker's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-speed,ddp}
mkdir -p "$OUT"
{ nvidia-smi || true; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } >"$OUT/machine.txt" 2>&1
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
if [[ ,$PARTS, == *,speed,* ]]; then
  "$PYTHON" bench/gpu.py --device "$DEVICE" --out "$OUT/gpu.json" ${GPU_ARGS:-} | tee "$OUT/gpu.txt"
  for run in "64 fp32" "512 bf16"; do
    set -- $run
    "$PYTHON" bench/overhead.py --case seed_cnn --device "$DEVICE" --batch-size "$1" --precision "$2" \
      ${OVERHEAD_ARGS:-} | tee "$OUT/overhead_seed_cnn_b$1_$2.txt"
  done
  "$PYTHON" bench/data_path.py --device "$DEVICE" --workers 0,4 ${DATA_ARGS:-} | tee "$OUT/data_path.txt"
fi
# shellcheck disable=SC2086
if [[ ,$PARTS, == *,ddp,* ]]; then
  # one thread on both sides, as torchrun sets for its workers
  OMP_NUM_THREADS=1 timeout 240 "$PYTHON" bench/ddp_step.py --device "$DEVICE" \
    --variants plain,ddp,ddp_hook,kdl --out "$OUT/ddp_step.json" ${STEP_ARGS:-} 2>&1 \
    | tee "$OUT/ddp_step.txt" || echo "bench/ddp_step.py ended early; what it printed is in ddp_step.txt"
  timeout 300 "$PYTHON" bench/ddp.py --device "$DEVICE" --rounds 2 --out "$OUT/ddp.json" ${DDP_ARGS:-} 2>&1 \
    | tee "$OUT/ddp.txt"
fi
if [[ ,$PARTS, == *,sweep,* ]]; then
  { timeout 60 "$PYTHON" -c "import os; from karpathy_runner.batch import forks
f = forks.Forks(dict(os.environ)); print('fork server serving:', f.serving); f.close()"
    timeout 60 "$PYTHON" -m karpathy_runner sweep configs/digits_cnn.yaml --grid seed=0,1 --jobs 2 \
      --set train.epochs=2 --set train.device="$DEVICE" --runs-dir "$OUT/sweep_runs"
    grep -h '"device"' "$OUT"/sweep_runs/*/meta.json; } 2>&1 | tee "$OUT/sweep.txt" \
    || echo "the sweep part ended early; what it printed is in sweep.txt"
fi
# shellcheck disable=SC2086
if [[ ,$PARTS, == *,ddp_runs,* ]]; then
  timeout 180 "$PYTHON" bench/ddp.py --device "$DEVICE" --variants 64:fp32 --rounds 1 --epochs 3 \
    --profile "$OUT/profiles" --out "$OUT/ddp_profile.json" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/ddp_profile.txt" \
    || echo "the profiled round ended early; what it printed is in ddp_profile.txt"
  timeout 350 "$PYTHON" bench/ddp.py --device "$DEVICE" --rounds 3 --epochs 3 --out "$OUT/ddp_rounds.json" \
    ${DDP_ARGS:-} 2>&1 | tee "$OUT/ddp_rounds.txt" \
    || echo "the rounds ended early; each run's line is in ddp_rounds.txt"
fi
echo "results in $OUT"
