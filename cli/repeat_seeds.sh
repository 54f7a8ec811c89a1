#!/bin/sh
# The same experiment with N seeds, then the mean, std and n of its metrics.
#
#   cli/repeat_seeds.sh [CONFIG] [N] [more `kdl sweep` options]
#   cli/repeat_seeds.sh configs/digits_cnn.yaml 5 --jobs 2
#
# Exit code: that of `kdl sweep` (0 all seeds completed, 1 some failed, 2 bad input, 130 interrupted).
set -u
config=${1:-configs/digits_cnn.yaml}
n=${2:-3}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] && shift

seeds=0
i=1
while [ "$i" -lt "$n" ]; do
    seeds="$seeds,$i"
    i=$((i + 1))
done

status=0
sweep=$(kdl sweep "$config" --grid "seed=$seeds" --skip-existing "$@") || status=$?
if [ -z "$sweep" ]; then
    echo "repeat_seeds.sh: kdl sweep failed before running anything (exit $status)" >&2
    exit "$status"
fi
# every run of the sweep shares its name: one group, statistics over the seeds
kdl compare --sweep "$sweep" --group-by name || exit $?
exit "$status"
