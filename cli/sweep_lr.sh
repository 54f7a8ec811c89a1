#!/bin/sh
# Learning-rate grid, then a table comparing the runs of the sweep.
#
#   cli/sweep_lr.sh [CONFIG] [LR,LR,...] [more `kdl sweep` options]
#   cli/sweep_lr.sh configs/cifar_cnn.yaml 0.1,0.03,0.01 --jobs 2 --set train.epochs=5
#
# Re-running the same command after an interruption runs only what is missing (--skip-existing).
# Exit code: that of `kdl sweep` (0 all points completed, 1 some failed, 2 bad input, 130 interrupted).
set -u
config=${1:-configs/digits_cnn.yaml}
lrs=${2:-0.03,0.01,0.003,0.001}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] && shift

status=0
sweep=$(kdl sweep "$config" --grid "optimizer.lr=$lrs" --skip-existing "$@") || status=$?
if [ -z "$sweep" ]; then
    echo "sweep_lr.sh: kdl sweep failed before running anything (exit $status)" >&2
    exit "$status"
fi
kdl compare --sweep "$sweep" || exit $?
exit "$status"
