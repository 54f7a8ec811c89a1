"""Which runs are the points of a sweep. A run a sweep makes carries the sweep's tag in its
meta.json; a run it takes as it is (`--skip-existing` finds the same config completed) or resumes
(the same config interrupted) was made before, by another sweep or by none, and is recorded as
this sweep's point in the sweep's own file: `<runs>/.sweeps/<sweep id>.jsonl`, one line per point,
appended (one write of a short line: points of a sweep that run at once never interleave). A run
may so belong to several sweeps, and no run folder is written by a process that does not own it.

A search with successive halving also records there each trial it prunes (its run paused at the
rung where it stopped), so that readers show the run as `pruned`, not as unfinished work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .fsio import read_jsonl_lines
from .layout import SWEEPS, made_folder, utc_now

TAKEN = ("reused", "resumed")  # how a sweep takes a run it did not make


def _append(root: Path, sweep: str, entry: dict[str, Any]) -> None:
    folder = made_folder(root / SWEEPS, root)
    line = json.dumps({**entry, "at": utc_now()}) + "\n"
    fd = os.open(folder / f"{sweep}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
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
