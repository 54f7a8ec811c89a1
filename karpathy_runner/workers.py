"""Whether torchrun started this process, and as which rank: read from the environment torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). No torch import, so the command
line can ask before torch loads."""

from __future__ import annotations

import os

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def in_worker() -> bool:
    """Whether this process was started by torchrun (kdl's launcher or the user's)."""
    return all(key in os.environ for key in LAUNCH_ENV)


def worker_rank() -> int:
    """This process's rank among the training processes: 0 when it is the only one."""
    return int(os.environ["RANK"]) if in_worker() else 0
