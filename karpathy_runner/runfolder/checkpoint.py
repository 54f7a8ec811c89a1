"""Checkpoints: the state copied on the training thread, written by torch.save on a thread of its
own (atomic replace, fsync), and loaded safely.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`weights_only=True`: a file carrying a pickled object that would run code is refused.

Its integrity is checked on every load: torch.save writes a zip archive that holds a CRC-32 of
each of its records, which torch.load does not check, so a byte changed on disk would load as
a wrong weight. The checksums are written with the bytes and renamed into place with them, so
a kill can never leave a checkpoint and its checksum out of step (as a checksum kept in another
file could be). A text run's checkpoint also holds a digest of the vocabulary it was trained
with: a vocab.json changed since is refused rather than silently encoding other tokens.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import KdlError
from .fsio import atomic_write

# the format of a checkpoint's dict; a kdl that changes it bumps this (see the version policy in
# docs/resuming.md), and a checkpoint of another format is refused with a clear error
FORMAT_VERSION = 2


def captured(state: Any, memo: dict[int, Any] | None = None) -> Any:
    """`state` with every tensor copied into CPU memory now, so that training steps that change
    the weights and optimizer state in place cannot reach it; containers rebuilt as they were
    (a state dict's OrderedDict with its `_metadata`), tensors shared in it still shared."""
    import torch

    memo = {} if memo is None else memo
    if isinstance(state, torch.Tensor):
        if id(state) not in memo:
            memo[id(state)] = state.detach().to("cpu", copy=True)
        return memo[id(state)]
    if isinstance(state, dict):
        copied = type(state)((key, captured(value, memo)) for key, value in state.items())
        if hasattr(state, "_metadata"):  # the module versions load_state_dict reads
            copied._metadata = state._metadata  # type: ignore[attr-defined]
        return copied
    if type(state) in (list, tuple):
        return type(state)(captured(value, memo) for value in state)
    return state


def serialise(state: dict[str, Any]) -> memoryview:
    """A checkpoint's bytes, as torch.save writes them (into memory: one write of the whole file
    is much faster than torch.save's many small ones into a file)."""
    import torch

    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    return buffer.getbuffer()


def save_checkpoint(paths: list[Path], state: dict[str, Any], folder_fd: int | None = None) -> None:
    """`state` (a `captured` copy) serialised and written as one file (temp file beside it, fsync,
    rename) under every path, in order; the last path's temp file is written and the others are
    hard links of it. `folder_fd`: their folder's, kept open by the caller (fsio.atomic_write).

    A kill at any moment leaves every path holding either its old or its new complete file.
    """
    *first, last = paths
    atomic_write(last, serialise(state), also=first, folder_fd=folder_fd)


class InBackground:
    """Jobs run one at a time, in order, by a thread of its own (started with the first), so
    that a checkpoint reaches the disk while training goes on. `start` waits for the job
    before; so does `wait`; an exception a job raised is raised there, in the training thread
    (once)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._thread is None:  # one thread for all jobs: no start-up to wait for at each
            self._thread = threading.Thread(target=self._work, name="kdl-checkpoint", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self) -> None:
        """Until the job is done, even through Ctrl-C (a write of a few seconds at most, and the
        run folder must not be written by two threads at once); then its error, if any."""
        interrupted = False
        while True:
            try:
                self._jobs.join()
                break
            except KeyboardInterrupt:
                interrupted = True
        error, self._error = self._error, None
        if error is not None:
            raise error
        if interrupted:
            raise KeyboardInterrupt

    def close(self) -> None:
        """The thread ends once its job is done, and is joined (a later `start` starts
        another): no thread of ours is left for the interpreter's exit to stop."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # raised again by `wait`, in the training thread
                self._error = exc
            finally:
                # the job's state (the copied tensors) freed here, before `wait` returns: a
                # tensor freed by this thread while the interpreter exits aborts the process
                job = None
                self._jobs.task_done()
        self._jobs.task_done()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; anything unsafe or damaged is a clear error."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise KdlError(f"checkpoint {path} does not exist; the run may not have finished an epoch")
    damaged = _failed_checksum(path)
    if damaged:
        raise KdlError(f"checkpoint {path} is damaged: {damaged} fails its CRC-32 check (bytes changed "
                       "on disk since it was written). Use the other checkpoint (--checkpoint "
                       "last|best), restore the file from a backup, or re-run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = next((line.strip() for line in text.splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), _first_line(exc))
        if "GLOBAL" not in text:  # garbage bytes, not a pickle that names code to call
            raise KdlError(f"{path} is not a kdl checkpoint (not a file torch wrote: {detail[:200]}). "
                           "Use the other checkpoint (--checkpoint last|best) or re-run.") from None
        raise KdlError(
            f"refused to load {path}: it holds pickled Python objects that could run code "
            f"({detail[:200]}). kdl only loads plain tensors and values; "
            "do not use checkpoints from untrusted sources."
        ) from None
    except Exception as exc:  # torch raises many kinds on damaged bytes (zip, EOF, index, ...)
        raise KdlError(
            f"checkpoint {path} cannot be read ({_first_line(exc)}); it is damaged "
            "or incomplete. Use the other checkpoint (--checkpoint last|best) or re-run."
        ) from None
    problem = _shape_problem(state)
    if problem:
        raise KdlError(f"{path} is not a kdl checkpoint ({problem}; format {FORMAT_VERSION} "
                       "expected). Use the other checkpoint (--checkpoint last|best) or re-run.")
    return state


def _failed_checksum(path: Path) -> str | None:
    """The record of the checkpoint's zip archive whose bytes do not match their CRC-32, or
    None. A file zipfile cannot open is left to torch.load, which says what is wrong with it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None
    return f"its record {bad}" if bad is not None else None


def vocabulary_digest(tokens: list[str] | None) -> str | None:
    """What a checkpoint keeps of the vocabulary its run encodes text with (vocab.json)."""
    return None if tokens is None else hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def check_vocabulary(state: dict[str, Any], tokens: list[str] | None, path: Path,
                     vocab: Path) -> None:
    """The vocabulary a run is rebuilt with must be the one its checkpoint `path` was trained
    with (a checkpoint from before digests were kept says nothing and passes)."""
    said = state.get("vocabulary")
    if said is not None and said != vocabulary_digest(tokens):
        raise KdlError(
            f"{vocab} is not the vocabulary checkpoint {path} was trained with (its digest differs): "
            "the text would be encoded with other token ids. Restore vocab.json from a backup, or "
            "remove it, and kdl builds it again from the training data as the run first did.")


KEYS = {"format", "models", "optimizers", "scaler", "loop", "task", "window", "rng"}
LOOP_KEYS = {"epoch", "batch", "step", "best_value", "best_epoch", "stop_value", "bad_epochs",
             "epoch_sums", "skipped_steps", "stop_reason"}


def _shape_problem(state: Any) -> str | None:
    """What makes a loaded object other than a kdl checkpoint, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}"
    if state.get("format") != FORMAT_VERSION:
        return f"format {state.get('format')!r}"
    # a run of several processes adds each rank's own state, a text run its vocabulary's digest
    if set(state) - (KEYS | {"ranks", "vocabulary"}) or KEYS - set(state):
        return f"keys {sorted(map(str, state))}, expected {sorted(KEYS)}"
    loop, models = state["loop"], state["models"]
    if not isinstance(loop, dict) or set(loop) - LOOP_KEYS or {"epoch", "batch", "step"} - set(loop):
        return f"loop keys {sorted(map(str, loop)) if isinstance(loop, dict) else loop!r}"
    if not all(isinstance(loop[k], int) and not isinstance(loop[k], bool)
               for k in ("epoch", "batch", "step")):
        return "a loop position that is not whole numbers"
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        return "models that are not state dicts"
    if not isinstance(state.get("vocabulary", ""), str):
        return "a vocabulary digest that is not text"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]
