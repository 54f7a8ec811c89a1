"""Atomic save, safe load: the one checkpoint format.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`weights_only=True`: a file carrying a pickled object that would run code is refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from .errors import KdlError
from .runs import atomic_write

# 2: step results by kind (losses, metric sums) and no "scheduler" entry; 1 is read and upgraded
FORMAT_VERSION = 2


def save_checkpoint(paths: list[Path], state: dict[str, Any]) -> None:
    """Serialise once, then for each path: temp file beside it, fsync, rename over it.

    A kill at any moment leaves every path holding either its old or its new complete file.
    """
    import torch

    buffer = io.BytesIO()  # one write of the whole file is much faster than torch.save's many
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    data = buffer.getbuffer()
    for path in paths:
        atomic_write(path, lambda handle: handle.write(data))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; anything unsafe or damaged is a clear error."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise KdlError(f"checkpoint {path} does not exist; the run may not have finished an epoch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KdlError(
            f"refused to load {path}: it holds pickled Python objects that could run code "
            f"({str(exc).splitlines()[0][:200]}). kdl only loads plain tensors and values; "
            "do not use checkpoints from untrusted sources."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise KdlError(
            f"checkpoint {path} cannot be read ({str(exc).splitlines()[0][:200]}); it is damaged "
            "or incomplete. Use the other checkpoint (--checkpoint last|best) or re-run."
        ) from None
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT_VERSION):
        raise KdlError(f"{path} is not a kdl checkpoint (format {FORMAT_VERSION} expected)")
    return _upgraded(state)


def _upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint (written by kdl before tasks reported typed step results, when
    classify was the only task) in format 2, so that its run resumes."""
    if state["format"] == 1:
        state.pop("scheduler", None)  # never read: schedules are functions of the step
        sums = state["loop"].get("epoch_sums") or {}
        if sums:  # {loss (x count), correct, count} -> {count, losses, sums}
            state["loop"]["epoch_sums"] = {"count": sums["count"], "losses": {"loss": sums["loss"]},
                                           "sums": {"correct": sums["correct"]}}
        state["window"] = [{"count": r["count"], "losses": {"loss": r["loss"] / r["count"]},
                            "sums": {"correct": r["correct"]}} for r in state["window"]]
        state["format"] = FORMAT_VERSION
    return state
