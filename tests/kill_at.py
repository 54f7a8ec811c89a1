"""The one hook that stops a `kdl train` process at an exact point: it sends a signal just before
the process's n-th os.replace onto a file of a given name (`*`: of any file), so a test stops a run
between two exact file writes however busy the machine is.

Installed two ways: by `signal_before` in a process forked by the test (stopping.fork), or, in a
process the test cannot fork (torchrun's workers, a sweep's points), at start-up by
tests/sitehook/sitecustomize.py from the environment (a sweep's points are forked by kdl's fork
server: there, as the server forks each): KDL_TEST_SIGNAL=NAME:N:SIGNAL:TARGET, with
TARGET `self`, `parent` (the launcher of a torchrun worker, a sweep), `parent-group` (the
launcher's process group, as a Ctrl-C at a terminal signals it) or `parent-and-self` (a sweep and
its trial, as a machine going down stops both, or a job's two processes, as Slurm signals a
job), and an optional fifth field naming
a file: the first process to signal creates it, and no other process signals after it (of several
trials of a sweep, one Ctrl-C). Two more variables pick the process and what it does after:
KDL_TEST_SIGNAL_PROCESS=K:FOLDER, only the K-th `kdl train` process to start (each takes the next
number by making FOLDER/1, FOLDER/2, ...); KDL_TEST_SIGNAL_LINGER=SECONDS, the process waits that
long after signalling before it goes on (a trial that killed its sweep is still running when the
sweep's command is run again).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

ENVIRONMENT = "KDL_TEST_SIGNAL"
PROCESS = "KDL_TEST_SIGNAL_PROCESS"
LINGER = "KDL_TEST_SIGNAL_LINGER"


def signal_before(name: str, nth: int, signum: int, target: str = "self", once: str | None = None,
                  linger: float = 0.0) -> None:
    """From now on, this process sends `signum` to `target` just before its `nth` replace of a
    file called `name` (`*`: any file), and goes on `linger` seconds later."""
    real_replace = os.replace
    seen = 0

    def replace(src, dst, *args, **kwargs):
        nonlocal seen
        if name in ("*", os.path.basename(dst)):
            seen += 1
            if seen == nth and _first(once):  # (which thread replaces it: training or checkpoint)
                print(f"kill_at: {name} {nth} in thread {threading.current_thread().name}"
                      + (f" ({os.path.basename(dst)})" if name == "*" else ""), file=sys.stderr, flush=True)
                _send(signum, target)
                time.sleep(linger)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def install_from_environment() -> None:
    """The hook KDL_TEST_SIGNAL asks for, if it is set. In kdl's fork server (a sweep's local
    points are forked from it, karpathy_runner/batch/forks.py) it is installed in each point as
    the server forks it, as it would be at the start of a fresh `kdl train` process."""
    if not os.environ.get(ENVIRONMENT):
        return
    if _fork_server():
        server = os.getpid()
        os.register_at_fork(after_in_child=lambda: os.getppid() == server and _install(forked=True))
    else:
        _install(forked=False)


def _install(forked: bool) -> None:
    if _chosen(os.environ.get(PROCESS), forked):
        name, nth, signum, target, *once = os.environ[ENVIRONMENT].split(":")
        signal_before(name, int(nth), getattr(signal, signum), target, once[0] if once else None,
                      float(os.environ.get(LINGER, "0")))


def _fork_server() -> bool:
    return sys.orig_argv[1:3] == ["-m", "karpathy_runner.forkserver"]


def _chosen(process: str | None, forked: bool) -> bool:
    """Is this the process KDL_TEST_SIGNAL_PROCESS picks (K:FOLDER: the K-th `kdl train`)?"""
    if process is None:
        return True
    if not forked and sys.orig_argv[1:4] != ["-m", "karpathy_runner", "train"]:
        return False
    k, folder = process.split(":", 1)
    Path(folder).mkdir(parents=True, exist_ok=True)
    number = 1
    while not _first(os.path.join(folder, str(number))):
        number += 1
    return number == int(k)


def _first(once: str | None) -> bool:
    if once is None:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _send(signum: int, target: str) -> None:
    launcher = _launcher()
    if target == "parent-group":  # as a terminal's Ctrl-C: the launcher's whole group
        os.killpg(os.getpgid(launcher), signum)
    elif target == "parent-and-self":
        os.kill(launcher, signum)
        os.kill(os.getpid(), signum)
    else:
        os.kill(launcher if target == "parent" else os.getpid(), signum)


def _launcher() -> int:
    """The process that started this one: its parent, or for a sweep's point forked by kdl's
    fork server, the server's parent (the sweep)."""
    parent = os.getppid()
    return parent_of(parent) if _fork_server() else parent


def parent_of(pid: int) -> int:
    """The pid of process `pid`'s parent, as /proc has it (OSError once `pid` is gone)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
