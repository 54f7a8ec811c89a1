"""The one hook that stops a `kdl train` process at an exact point: it sends a signal just before
the process's n-th os.replace onto a file of a given name, so a test stops a run between two
exact file writes however busy the machine is.

Installed two ways: by `signal_before` in a process forked by the test (stopping.fork), or, in a
process the test cannot fork (torchrun's workers, a sweep's points), at start-up by
tests/sitehook/sitecustomize.py from the environment: KDL_TEST_SIGNAL=NAME:N:SIGNAL:TARGET, with
TARGET `self`, `parent` (the launcher of a torchrun worker) or `parent-group` (the launcher's
process group, as a Ctrl-C at a terminal signals it), and an optional fifth field naming a file:
the first process to signal creates it, and no other process signals after it (of several
trials of a sweep, one Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENVIRONMENT = "KDL_TEST_SIGNAL"


def signal_before(name: str, nth: int, signum: int, target: str = "self", once: str | None = None) -> None:
    """From now on, this process sends `signum` to `target` just before its `nth` replace of a
    file called `name`."""
    real_replace = os.replace
    seen = 0

    def replace(src, dst, *args, **kwargs):
        nonlocal seen
        if os.path.basename(dst) == name:
            seen += 1
            if seen == nth and _first(once):  # (which thread replaces it: training or checkpoint)
                print(f"kill_at: {name} {nth} in thread {threading.current_thread().name}",
                      file=sys.stderr, flush=True)
                _send(signum, target)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def install_from_environment() -> None:
    """The hook KDL_TEST_SIGNAL asks for, if it is set."""
    spec = os.environ.get(ENVIRONMENT)
    if spec:
        name, nth, signum, target, *once = spec.split(":")
        signal_before(name, int(nth), getattr(signal, signum), target, once[0] if once else None)


def _first(once: str | None) -> bool:
    if once is None:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _send(signum: int, target: str) -> None:
    if target == "parent-group":  # as a terminal's Ctrl-C: the launcher's whole group
        os.killpg(os.getpgid(os.getppid()), signum)
    else:
        os.kill(os.getppid() if target == "parent" else os.getpid(), signum)
