"""Which runs are the points of a sweep. A run a sweep makes carries the sweep's tag in its
meta.json; a run it takes as it is (`--skip-existing` finds the same config completed) or resumes
(the same config interrupted) was made before, by another sweep or by none, and is recorded as
this sweep's point in the sweep's own file: `<runs>/.sweeps/<sweep id>.jsonl`, one line per point,
appended (one write of a short line: points of a sweep that run at once never interleave). A run
may so belong to several sweeps, and no run folder is written by a process that does not own it.

A search with successive halving also records there each trial it prunes (its run paused at the
rung where it stopped), so that readers show the run as `pruned`, not as unfinished work.

`kdl train --skip-existing` claims its config first (`claim`): a lock on
`<runs>/.sweeps/claims/<config hash>.lock`, held while it looks for a run of the config and
trains or resumes one, so that two sweeps of one grid at once train each point once: the second
waits, then takes the run the first made.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fsio import read_jsonl_lines, refuse_foreign
from .layout import SWEEPS, made_folder, utc_now
from .locks import Lock

TAKEN = ("reused", "resumed")  # how a sweep takes a run it did not make
CLAIMS = "claims"  # in .sweeps: a lock per config that `kdl train --skip-existing` trains


def _folder(root: Path, *names: str) -> Path:
    """A folder of kdl's in the runs folder (.sweeps, .sweeps/claims), made if missing; a
    symlink or anything else there is refused (nothing is written through it)."""
    folder = made_folder(root, root)
    for name in (SWEEPS, *names):
        folder = folder / name
        refuse_foreign(folder, stat.S_ISDIR)
        made_folder(folder, root)
    return folder


def claim(root: Path, config_hash: str, wait: Callable[[str], None]) -> Lock:
    """This process's claim on the config `config_hash` in the runs folder `root`. Another
    process's claim: `wait` hears its pid, then this one waits for it to let go."""
    path = _folder(root, CLAIMS) / f"{config_hash}.lock"
    return Lock(path, f"config {config_hash}", transient=True).acquire(wait)


def _append(root: Path, sweep: str, entry: dict[str, Any]) -> None:
    _append_to(_folder(root) / f"{sweep}.jsonl", entry)


def _append_to(path: Path, entry: dict[str, Any]) -> None:
    line = json.dumps({**entry, "at": utc_now()}) + "\n"
    refuse_foreign(path, stat.S_ISREG)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record(root: Path, sweep: str, run_id: str, point: dict[str, Any], how: str) -> None:
    """Record run `run_id` as the point `point` of `sweep`, taken `how` (reused or resumed)."""
    _append(root, sweep, {"run": run_id, "point": point, "how": how})


def record_pruned(root: Path, sweep: str, run_id: str, epochs: int) -> None:
    """Record that search `sweep` pruned its trial run `run_id`, paused after `epochs` epochs
    (once: a halving study run again finds it recorded)."""
    if pruned(root, sweep).get(run_id) != epochs:
        _append(root, sweep, {"run": run_id, "pruned_at_epoch": epochs})


def pruned(root: Path, sweep: str) -> dict[str, int]:
    """The trial runs search `sweep` pruned: run id -> the epochs it had trained then."""
    records = read_jsonl_lines(root / SWEEPS / f"{sweep}.jsonl")
    return {r["run"]: r["pruned_at_epoch"] for r in records
            if isinstance(r.get("run"), str) and type(r.get("pruned_at_epoch")) is int}


def taken(root: Path, sweep: str) -> dict[str, str]:
    """The runs `sweep` took without making them: run id -> how (the latest record of each)."""
    records = read_jsonl_lines(root / SWEEPS / f"{sweep}.jsonl")
    return {r["run"]: r["how"] for r in records
            if isinstance(r.get("run"), str) and r.get("how") in TAKEN}


JOBS = "jobs"  # in .sweeps/<sweep id>: submitit's folder, and (.jsonl) the record of its jobs


def sweep_folder(root: Path, sweep: str) -> Path:
    """The folder of a sweep whose points are jobs, made if missing (its lock, its jobs)."""
    return _folder(root, sweep)


def jobs_folder(root: Path, sweep: str) -> Path:
    """The folder of the sweep's jobs, made if missing (submitit writes there)."""
    return _folder(root, sweep, JOBS)


def record_job(root: Path, sweep: str, entry: dict[str, Any]) -> None:
    """Record a job submitted for a point of `sweep` (its key, its job id, its launcher)."""
    _append_to(_folder(root, sweep) / f"{JOBS}.jsonl", entry)


def recorded_jobs(root: Path, sweep: str) -> list[dict[str, Any]]:
    """The jobs submitted for `sweep`, oldest first (no file: none)."""
    return [r for r in read_jsonl_lines(root / SWEEPS / sweep / f"{JOBS}.jsonl")
            if isinstance(r.get("job"), str) and type(r.get("key")) is int]
