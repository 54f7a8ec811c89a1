"""`python -m karpathy_runner.forkserver FD`: the process a sweep's local points are forked from
(batch/forks.py, which starts it). It imports what `kdl train` imports, serves the sweep on the
socket FD, and each point, once forked, runs `kdl train` as `python -m karpathy_runner` does."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _preload() -> None:
    """What every point imports, once: torch, kdl's command line, training and TensorBoard
    writer (the default tracker), and what torch's first optimizer imports (torch._dynamo: most
    of the seconds). None of it starts a thread or touches a GPU (see _safe)."""
    import torch

    from . import cli, evaluate, session  # noqa: F401
    from .trackers import tensorboard  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)])


def _safe() -> bool:
    """Can a point be forked from here? A fork has only the thread that forked, and a lock that
    another thread held stays held for ever; it cannot use CUDA once its parent has. A server
    that has either does not serve, and the sweep starts fresh processes. (numpy's OpenBLAS
    starts a thread of its own as torch imports it, unless OMP_NUM_THREADS=1; OpenBLAS stops it
    for a fork and starts it again after, as every process that forks with numpy relies on.)"""
    import threading

    import torch

    return threading.active_count() == 1 and not torch.cuda.is_initialized()


if __name__ == "__main__":
    from .cli import exit_last, main

    ending = exit_last()  # a point's last exit handler, registered before torch registers its own
    try:
        _preload()
    except Exception:  # noqa: BLE001  each point meets the same error, and reports it as its own
        pass
    if not _safe():
        os._exit(0)
    from .batch import forks

    argv = forks.serve(int(sys.argv[1]))
    if argv is None:  # the sweep closed its end: the server ends, without tearing torch down
        os._exit(0)
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *argv]  # a point
    main(ending)
