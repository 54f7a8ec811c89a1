"""Atomic save, safe load: the one checkpoint format.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`weights_only=True`: a file carrying a pickled object that would run code is refused.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import KdlError
from .runs import atomic_write

# 2: step results by kind (losses, metric sums) and no "scheduler" entry; 1 is read and upgraded
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


# a state of at most this many tensor bytes on the CPU is serialised at once, on the training
# thread: its cost is pickling (0.44 ms for a small CNN with Adam, `_Pickler`), which holds the
# GIL and, done by the checkpoint thread, stalls training as long or longer. A larger
# state's cost is copying its bytes, which the checkpoint thread does without the GIL.
AT_ONCE_BYTES = 1 << 20


def snapshot(state: dict[str, Any]) -> Callable[[], memoryview]:
    """The checkpoint of `state` as it is now, for the checkpoint thread: a function that
    returns its bytes. A small state on the CPU is serialised now; any other is `captured` now
    and serialised by the function."""
    tensors = list(_tensors(state))
    if (all(t.device.type == "cpu" for t in tensors)
            and sum(t.nbytes for t in tensors) <= AT_ONCE_BYTES):
        data = serialise(state)
        return lambda: data
    copied = captured(state)
    return lambda: serialise(copied)


def _tensors(state: Any) -> Iterator[Any]:
    """The tensors in a state of dicts, lists and tuples."""
    import torch

    for value in state.values() if isinstance(state, dict) else state:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict) or type(value) in (list, tuple):
            yield from _tensors(value)


def serialise(state: dict[str, Any]) -> memoryview:
    """A checkpoint's bytes: torch.save's file, written by `_Pickler` where it can (every
    tensor a plain one on the CPU), else by torch.save itself."""
    import torch

    state = {"format": FORMAT_VERSION, **state}
    buffer = io.BytesIO()  # one write of the whole file is much faster than torch.save's many
    try:
        _save_lean(state, buffer)
    except Exception:  # a tensor it leaves to torch.save, or a torch whose internals moved
        buffer = io.BytesIO()
        torch.save(state, buffer)
    return buffer.getbuffer()


def _save_lean(state: dict[str, Any], buffer: io.BytesIO) -> None:
    """torch.save's zip file (records, names and order as torch.save writes them), its pickle
    made by `_Pickler`."""
    import torch

    pickled = io.BytesIO()
    pickler = _Pickler(pickled)
    pickler.dump(state)
    alignment = str(torch.serialization._get_storage_alignment())
    with torch.serialization._open_zipfile_writer(buffer) as writer:
        for name, value in [("data.pkl", pickled.getvalue()), (".format_version", "1"),
                            (".storage_alignment", alignment), ("byteorder", sys.byteorder)]:
            writer.write_record(name, value, len(value))
        for stored, storage, _ in pickler.storages.values():
            writer.write_record(f"data/{stored.key}", storage, storage.nbytes())


class _Stored:
    """A storage as the pickle names it: torch.load finds its bytes by `key`."""

    __slots__ = ("kind", "key", "numel")

    def __init__(self, kind: Any, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class _Pickler(pickle.Pickler):
    """The pickle torch.save makes of a state of plain CPU tensors, byte for byte, at under
    half its cost (a checkpoint taken on the training thread is paid for by training).
    torch.save's pickler calls a Python function for every object it pickles (some twenty per
    tensor) and reduces each tensor through several more; this one reduces a tensor in one
    call and answers the per-object question with a type check. It refuses (raises) any other
    kind of tensor, for torch.save to write."""

    def __init__(self, file: io.BytesIO):
        import torch
        from torch._utils import _rebuild_tensor_v2

        super().__init__(file, protocol=2)
        self.storages: dict[int, tuple[_Stored, Any, Any]] = {}  # id -> (name, storage, dtype)
        self._torch, self._rebuild = torch, _rebuild_tensor_v2

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _Stored:  # a new tuple each time, as torch.save's (not memoised)
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        torch = self._torch
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        kind = _storage_kinds().get(obj.dtype)
        if (type(obj) is not torch.Tensor or kind is None or obj.device.type != "cpu"
                or obj.layout != torch.strided or obj.__dict__ or torch._C._get_tensor_metadata(obj)):
            raise TypeError(f"a tensor torch.save reduces its own way: {type(obj).__name__}, "
                            f"{obj.dtype}, {obj.layout}, on {obj.device}")
        storage = obj.untyped_storage()
        seen = self.storages.get(storage._cdata)
        if seen is None:
            name = _Stored(getattr(torch, kind), str(len(self.storages)),
                           storage.nbytes() // obj.element_size())
            seen = self.storages[storage._cdata] = (name, storage, obj.dtype)
        elif seen[2] != obj.dtype:  # torch.save refuses one storage seen as two dtypes
            raise TypeError("one storage viewed as two dtypes")
        return (self._rebuild, (seen[0], obj.storage_offset(), tuple(obj.size()), obj.stride(),
                                obj.requires_grad, collections.OrderedDict()))


@functools.cache
def _storage_kinds() -> dict[Any, str]:
    """The storage class torch.save names for each dtype `_Pickler` writes."""
    import torch

    return {torch.float32: "FloatStorage", torch.float64: "DoubleStorage",
            torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
            torch.int64: "LongStorage", torch.int32: "IntStorage", torch.int16: "ShortStorage",
            torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}


def save_checkpoint(paths: list[Path], data: memoryview, folder_fd: int | None = None) -> None:
    """Serialised bytes as one file (temp file beside it, fsync, rename) under every path, in
    order; the last path's temp file is written and the others are hard links of it.
    `folder_fd`: their folder's, kept open by the caller (runs.atomic_write).

    A kill at any moment leaves every path holding either its old or its new complete file.
    """
    *first, last = paths
    atomic_write(last, data, also=first, folder_fd=folder_fd)


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
    return _upgraded(state)


KEYS = {"format", "models", "optimizers", "scaler", "loop", "task", "window", "rng"}
LOOP_KEYS = {"epoch", "batch", "step", "best_value", "best_epoch", "stop_value", "bad_epochs",
             "epoch_sums", "skipped_steps", "stop_reason"}


def _shape_problem(state: Any) -> str | None:
    """What makes a loaded object other than a kdl checkpoint, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}"
    if state.get("format") not in (1, FORMAT_VERSION):
        return f"format {state.get('format')!r}"
    # format 1 had a scheduler entry; a run of several processes adds each rank's own state
    expected = KEYS | ({"scheduler"} if state["format"] == 1 else {"ranks"})
    if set(state) - expected or KEYS - set(state):
        return f"keys {sorted(map(str, state))}, expected {sorted(KEYS)}"
    loop, models = state["loop"], state["models"]
    if not isinstance(loop, dict) or set(loop) - LOOP_KEYS or {"epoch", "batch", "step"} - set(loop):
        return f"loop keys {sorted(map(str, loop)) if isinstance(loop, dict) else loop!r}"
    if not all(isinstance(loop[k], int) and not isinstance(loop[k], bool)
               for k in ("epoch", "batch", "step")):
        return "a loop position that is not whole numbers"
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        return "models that are not state dicts"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


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
