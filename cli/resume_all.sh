#!/bin/sh
# Resume every interrupted or crashed run in the runs folder, one after the other.
#
#   cli/resume_all.sh [more `kdl train` options, e.g. --quiet]
#
# Uses KDL_RUNS_DIR (or ./runs). Prints the id of each run it resumed; exit code 0 when every
# resumed run completed, else the last non-zero exit code (130 stops at once: you pressed Ctrl-C).
set -u
ids=$(kdl runs --status interrupted --status crashed --csv | tail -n +2 | cut -d, -f1) || exit $?

status=0
for id in $ids; do
    echo "resuming $id" >&2
    kdl train --resume "$id" "$@" >/dev/null
    code=$?
    case $code in
        0) echo "$id" ;;
        130|143) exit "$code" ;;
        *) echo "resume_all.sh: $id ended with exit code $code" >&2; status=$code ;;
    esac
done
exit "$status"
