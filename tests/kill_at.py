"""`kdl` as a real process that signals itself just before the n-th os.replace onto a file of a
given name (counted in this process), so a test can stop it between two exact file writes:

    python tests/kill_at.py NAME N SIGNAL kdl-arguments...   e.g. meta.json 3 SIGKILL train ...

(stopping.fork installs the same hook in a forked `kdl train`.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def signal_before(name: str, nth: int, signum: int) -> None:
    """From now on, this process sends itself `signum` just before its `nth` replace of `name`."""
    real_replace = os.replace
    seen = 0

    def replace(src, dst):
        nonlocal seen
        if os.path.basename(dst) == name:
            seen += 1
            if seen == nth:  # (which thread replaces it: the training one or a checkpoint's)
                print(f"kill_at: {name} {nth} in thread {threading.current_thread().name}", flush=True)
                os.kill(os.getpid(), signum)
        return real_replace(src, dst)

    os.replace = replace


if __name__ == "__main__":
    from karpathy_runner.cli import main

    signal_before(sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3]))
    sys.argv = ["kdl", *sys.argv[4:]]
    main()
