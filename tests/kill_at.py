"""A hook that makes a `kdl train` process signal itself just before its n-th os.replace onto a
file of a given name, so a test can stop it between two exact file writes (stopping.fork
installs it in the forked process, e.g. ("meta.json", 3, "SIGKILL"))."""

from __future__ import annotations

import os
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
