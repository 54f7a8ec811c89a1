"""Whether torchrun started this process, and as which rank: read from the environment torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). No torch import, so the command
line can ask before torch loads."""

from __future__ import annotations

import json
import os
import sys

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# kdl's launcher's own command line (JSON), set for the workers it starts
LAUNCHED_AS = "KDL_LAUNCHED_AS"
# a folder of kdl's launcher where its workers leave their errors, for it to say each once
ERRORS = "KDL_WORKER_ERRORS"


def in_worker() -> bool:
    """Whether this process was started by torchrun (kdl's launcher or the user's)."""
    return all(key in os.environ for key in LAUNCH_ENV)


def worker_rank() -> int:
    """This process's rank among the training processes: 0 when it is the only one."""
    return int(os.environ["RANK"]) if in_worker() else 0


def command_line(argv: list[str]) -> list[str]:
    """How the run was launched, as meta.json records it: `kdl ARGV`; in a worker of kdl's
    launcher, the launcher's command (`kdl train ... --nproc-per-node N`, what the user ran),
    not the worker's own."""
    if in_worker():
        try:
            launched = json.loads(os.environ.get(LAUNCHED_AS, ""))
        except ValueError:
            launched = None
        if isinstance(launched, list) and launched and all(isinstance(a, str) for a in launched):
            return launched
    return ["kdl", *argv]


def say_error(text: str, label: str = "") -> None:
    """`error: LABEL TEXT` on stderr, as kdl says an error; in a worker of kdl's launcher, the
    error is left for the launcher instead, which says each of its workers' errors once, as its
    last line (N processes that fail alike: one paragraph)."""
    if not _leave_error(text):
        print(f"error: {label}{text}", file=sys.stderr, flush=True)


def _leave_error(text: str) -> bool:
    """Leave `text` in the folder of kdl's launcher (True), or not: no such launcher, no folder."""
    folder = os.environ.get(ERRORS) if in_worker() else None
    if not folder:
        return False
    path = os.path.join(folder, os.environ["RANK"])
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(path + ".tmp", path)
    except OSError:
        return False
    return True


def left_errors(folder: str) -> dict[int, str]:
    """The errors the workers left in `folder`, by rank."""
    errors: dict[int, str] = {}
    for name in os.listdir(folder):
        if name.isdigit():
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as file:
                errors[int(name)] = file.read()
    return errors
