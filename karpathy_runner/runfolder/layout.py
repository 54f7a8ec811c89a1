"""The run folder's layout: the names of its files, where run folders live, new run ids and the
atomic creation of a folder, and what a run records about where it was launched.

Imports nothing heavy (no torch, no pydantic), like the rest of runfolder/ but the writer and
the checkpoint thread, so that `kdl runs` and `kdl show` start fast.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import KdlError

DEFAULT_RUNS_DIR = "runs"
STATUSES = ("running", "completed", "paused", "pruned", "failed", "interrupted", "crashed", "damaged")

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
VOCAB = "vocab.json"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
SAMPLES = "samples"
EXPORT = "export"
TENSORBOARD = "tb"
LOCK = ".lock"
SWEEPS = ".sweeps"  # in the runs folder: the runs each sweep took without making them
TEMP_SUFFIX = ".tmp"
# what kdl writes in a run folder: files, and folders of files (a symlink at any is refused)
OWN_FILES = (CONFIG, META, METRICS, SUMMARY, VOCAB, LOG, LOCK)
OWN_FOLDERS = (CHECKPOINTS, EVAL, SAMPLES, EXPORT, TENSORBOARD)


def runs_dir(option: str | Path | None = None) -> Path:
    """--runs-dir, else $KDL_RUNS_DIR, else ./runs."""
    return Path(option or os.environ.get("KDL_RUNS_DIR") or DEFAULT_RUNS_DIR)


def run_ref(folder: Path) -> str:
    """How a command kdl prints names the run in `folder`: its id, followed by `--runs-dir` and
    the whole path of its runs folder where that is not the one the command would read without
    it ($KDL_RUNS_DIR, else ./runs), so that the command works as printed."""
    root = os.path.abspath(folder.parent)
    if root == os.path.abspath(runs_dir()):
        return folder.name
    return f"{folder.name} --runs-dir {shlex.quote(root)}"


def host_name() -> str:
    """This machine's name as kdl records it (a run's meta.json, a study's trials): $KDL_HOST, else
    the host name. KDL_HOST names a machine whose host name does not tell it apart (containers that
    share one) or is not stable (a cluster job that may land on another node); two machines
    sharing a runs folder or a study must not share a name."""
    name = os.environ.get("KDL_HOST") or socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):  # it names a folder, too
        raise KdlError(f"KDL_HOST={name!r} is not a machine name kdl can use: give letters, digits, "
                       "'.', '_' or '-' (at most 100, the first a letter or digit), or unset it to "
                       "use the host name")
    return name


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id(name: str) -> str:
    import secrets

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{name}-{secrets.token_hex(3)}"


def made_folder(folder: Path, root: Path) -> Path:
    """`folder` (the runs folder `root` or one inside it), made if missing; a runs folder that
    is a file, a symlink loop or not writable is an error naming it, not an OSError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        inside = "" if folder == root else f" (its {folder.relative_to(root)})"
        raise KdlError(f"cannot create the runs folder {root}{inside}: {exc.strerror}. Choose "
                       "another with --runs-dir or KDL_RUNS_DIR.") from None
    return folder


def create_run_folder(root: Path, name: str) -> Path:
    """A fresh run folder; mkdir is atomic, so parallel launches never share one."""
    made_folder(root, root)
    for _ in range(100):
        folder = root / new_run_id(name)
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise KdlError(
                f"cannot create a run folder in {root}: {exc.strerror}. "
                "Check that it is writable and has space, or choose another with --runs-dir."
            ) from None
        (folder / CHECKPOINTS).mkdir()
        return folder
    raise KdlError(f"could not find a free run id in {root} after 100 tries")




# A training process touches its run's .lock every HEARTBEAT_S seconds (meta.json's heartbeat_s):
# on another machine, which cannot look its pid up, that is how its run reads `running`; one
# that missed STALE_BEATS beats is gone (killed, out of memory, its node failed), and its run
# `crashed`. The machines' clocks must agree to within the margin (NTP does).
HEARTBEAT_S = 15
STALE_BEATS = 8


class Heartbeat:
    """Keeps the modification time of `path` (the run's .lock, which the run's process holds)
    fresh from a daemon thread until `stop`. The file is never opened (closing a descriptor of
    it could drop the lock where flock is emulated by POSIX locks), and a symlink swapped in is
    touched itself, never what it points to."""

    def __init__(self, path: Path, every: float = HEARTBEAT_S):
        self._path = path
        self._every = every
        self._stopped = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"kdl-heartbeat {path.parent.name}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        try:
            os.utime(self._path, follow_symlinks=False)
        except OSError:  # a full or read-only disk for a moment: the next beat tries again
            pass

    def _run(self) -> None:
        while not self._stopped.wait(self._every):
            self._beat()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._thread.join()


def beating(folder: Path, meta: dict[str, Any]) -> bool:
    """Does the process of a `running` run on another machine still beat (its .lock touched in
    the last STALE_BEATS heartbeats)? A run of a kdl without the heartbeat (no heartbeat_s in
    its meta.json) cannot tell: it is taken at its word."""
    every = meta.get("heartbeat_s")
    if type(every) not in (int, float) or every <= 0:
        return True
    try:
        touched = os.stat(folder / LOCK, follow_symlinks=False).st_mtime
    except OSError:
        return False
    return time.time() - touched < STALE_BEATS * every


def process_start_time(pid: int) -> int | None:
    return _start_time(_stat(pid))


def process_running(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` runs: it exists, has not ended unreaped (a zombie, killed with its
    parent and waiting for init, answers a signal 0 but runs nothing), and, given `started` (its
    start time as `process_start_time` read it), is that process, not a later one of its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists, and /proc still tells its state and start
    fields = _stat(pid)
    if not fields:  # no /proc: the signal's answer
        return True
    return fields[0] != "Z" and (started is None or _start_time(fields) in (None, started))


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name (state first); None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(fields: list[str] | None) -> int | None:
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def run_environment(command: list[str]) -> dict[str, Any]:
    """Where and how a run was launched (torch versions are added by session.py)."""
    import platform
    import sys

    pid = os.getpid()
    return {
        "command": command,
        "cwd": os.getcwd(),
        "host": host_name(),
        "pid": pid,
        "pid_started": process_start_time(pid),
        "heartbeat_s": HEARTBEAT_S,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

