"""Stopping a run at an exact step, in-process or as a real process, and comparing runs bit for bit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from kdl import CONFIGS, TINY, Result, kdl
from kill_at import signal_before

from karpathy_runner.cli import main
from karpathy_runner.runfolder.checkpoint import load_checkpoint
from karpathy_runner.tasks.classify import Classify

# everything that draws random numbers, on the deterministic CPU path: shuffling, dropout,
# augmentation (digits are 8x8, so the crop pads by 1), a mid-epoch checkpoint every 4 steps, a
# log window (3) that is not a divisor of the epoch (21 steps), early stopping that never fires
RANDOM = [
    *TINY,
    "train.deterministic=true",
    "model.dropout=0.3",
    "data.augment=[crop,flip]",
    "data.crop_padding=1",
    "train.checkpoint_every_steps=4",
    "train.log_every_steps=3",
    "train.early_stopping.patience=5",
]
STEPS_PER_EPOCH = 21  # 1,294 digits training images in batches of 64
# the same for a tiny segmentation of the shapes (configs/shapes_segment.yaml): 16x16 images, the
# same crop and flip drawn for an image and its mask, batch norm, 84 images: 21 steps an epoch too
SEGMENT_RANDOM = [
    "data.image_size=16", "data.train_images=84", "data.val_images=8", "data.test_images=0",
    "data.batch_size=4", "model.channels=[4,8]", "data.augment=[crop,flip]", "data.crop_padding=2",
    "train.epochs=2", "train.device=cpu", "train.deterministic=true", "train.checkpoint_every_steps=4",
    "train.log_every_steps=3", "train.early_stopping.patience=5",
]
VOLATILE = {"time", "samples_per_s", "duration_s"}  # wall-clock fields: the only ones allowed to differ


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread, as the `kdl train` processes of these tests use (OMP_NUM_THREADS=1).

    Runs compared bit for bit must use the same number of threads; and on a busy 2-core machine
    two spin-waiting threads make a tiny run ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sets(overrides: Iterable[str]) -> list[str]:
    return [item for s in overrides for item in ("--set", s)]


def train(runs: Path, *overrides: str, resume: str | None = None) -> Result:
    """`kdl train` of digits with RANDOM and `overrides`, in-process; or `--resume RUN`."""
    if resume:
        return kdl("train", "--resume", resume, "--runs-dir", runs, "--quiet")
    return kdl("train", CONFIGS / "digits_cnn.yaml", *sets([*RANDOM, *overrides]), "--runs-dir", runs,
               "--quiet")


def signal_at(monkeypatch, steps: Iterable[int], signum: int = signal.SIGINT, times: int = 1,
              task: type = Classify) -> None:
    """Deliver `signum` (`times` times) to this process during step n, for each n in `steps`,
    from inside the `task` class's train step.

    Steps count from 1 like metrics.jsonl's `step`; each fires once, so a resumed run that
    passes the same step again is not stopped twice.
    """
    pending = set(steps)
    original = task.train_step

    def train_step(self, batch, step, updater):
        result = original(self, batch, step, updater)
        if step + 1 in pending:
            pending.discard(step + 1)
            for _ in range(times):
                signal.raise_signal(signum)
                time.sleep(0.01)  # let the handler run before the next one arrives
        return result

    monkeypatch.setattr(task, "train_step", train_step)


def stopped_and_resumed(monkeypatch, start: Callable[[Path], Result], runs: Path, stops: list[int],
                        task: type, each: Callable[[Path, int], None] | None = None) -> Path:
    """The folder of the run `start(runs)` begins, stopped by SIGINT during each of `stops` (from
    inside the `task` class's step) and resumed by `kdl train --resume` each time until it
    completes. At each stop the run exited 130 with a checkpoint of that step; `each(folder,
    stop)` checks more there. Each resume goes on in the same folder."""
    signal_at(monkeypatch, stops, task=task)
    result = start(runs)
    folder = runs / result.last_line
    for stop in stops:
        assert result.exit_code == 130, result.stderr
        assert final_state(folder)["loop"]["step"] == stop  # the step in flight was finished
        if each is not None:
            each(folder, stop)
        result = train(runs, resume=folder.name)
        assert result.last_line == folder.name
    assert result.exit_code == 0, result.stderr
    return folder


def final_state(folder: Path, which: str = "last") -> dict[str, Any]:
    return load_checkpoint(folder / "checkpoints" / f"{which}.pt")


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Equal structure, and every tensor equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(resumed: Path, uninterrupted: Path) -> None:
    """Weights, optimizer state, metrics and summary identical, wall-clock fields aside."""
    for which in ("last", "best"):
        a, b = final_state(resumed, which), final_state(uninterrupted, which)
        assert_same_tensors(a["models"], b["models"], f"{which}.models")
        assert_same_tensors(a["optimizers"], b["optimizers"], f"{which}.optimizers")
        for key in ("epoch", "step", "batch", "best_value", "best_epoch", "bad_epochs"):
            assert a["loop"][key] == b["loop"][key], (which, key)
    assert metrics(resumed) == metrics(uninterrupted)
    assert summary(resumed) == summary(uninterrupted)


def metrics(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def summary(folder: Path) -> dict[str, Any]:
    """summary.json less wall-clock fields and the `kdl eval` results recorded in it (made by
    other processes, not by training)."""
    return {k: v for k, v in read_json(folder / "summary.json").items()
            if k not in VOLATILE and k != "eval"}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def only_run(runs: Path) -> Path:
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


# ----------------------------------------------------------------------------- real processes


def launch(runs: Path, *args: str, env: dict[str, str] | None = None, **popen: Any
           ) -> subprocess.Popen:
    """`kdl train ...` as a fresh process (`python -m karpathy_runner`), output to a log file:
    for what needs a start of its own (torchrun's processes, launches racing each other);
    `fork` starts the others sooner."""
    runs.mkdir(parents=True, exist_ok=True)
    log = open(runs.parent / f"kdl-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    env = {**os.environ, "KDL_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           **(env or {})}
    command = [sys.executable, "-m", "karpathy_runner", "train", *args, "--quiet"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, **popen)
    process.log_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return process


class Forked:
    """A `kdl train` started by `fork`, waited on as a subprocess.Popen is."""

    def __init__(self, pid: int, log_path: Path):
        self.pid, self.log_path, self.returncode = pid, log_path, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["kdl", "train"], timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def fork(runs: Path, *args: str, kill_at: tuple[str, int, str] | None = None,
         env: dict[str, str] | None = None, start_new_session: bool = False) -> Forked:
    """`kdl train ...` in a forked copy of this process, output to a log file, as `launch` runs
    it (a process of its own, one thread) without the seconds that a fresh interpreter spends
    importing torch: for tests of what a kill or a signal leaves behind. With `kill_at` (file
    name, n, signal name) it signals itself just before its n-th replace of that file
    (tests/kill_at.py).
    The copy never returns into the test: it leaves by os._exit with kdl's exit code."""
    runs.mkdir(parents=True, exist_ok=True)
    log_path = runs.parent / f"kdl-{time.monotonic_ns()}.log"
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(log)
        return Forked(pid, log_path)
    code = 1
    try:
        if start_new_session:
            os.setsid()
        for fd in (1, 2):
            os.dup2(log, fd)
        sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))  # noqa: SIM115
        os.environ.update({"KDL_RUNS_DIR": str(runs), **(env or {})})
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for a launched process
        if kill_at:
            signal_before(kill_at[0], int(kill_at[1]), getattr(signal, kill_at[2]))
        sys.argv = ["kdl", "train", *map(str, args), "--quiet"]
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # the copy must reach os._exit whatever happens
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def train_command(*overrides: str) -> list[str]:
    return [str(CONFIGS / "digits_cnn.yaml"), *sets(overrides)]


def segment_command(shapes: Path, *overrides: str) -> list[str]:
    """The tiny segmentation run of SEGMENT_RANDOM, its shapes drawn into (or read from) `shapes`."""
    return [str(CONFIGS / "shapes_segment.yaml"), *sets([*SEGMENT_RANDOM, f"data.root={shapes}", *overrides])]


def output(process: subprocess.Popen) -> str:
    return process.log_path.read_text()  # type: ignore[attr-defined]


def free_port() -> int:
    """A port nothing listens on (a moment later, something may)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def checkpointed_step(path: Path) -> int:
    """The step a checkpoint holds, read without reading its tensors (a detector's is 150 MB;
    the test polls it while the run trains)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["loop"]["step"]


def assert_resumes_after_random_kill(tmp_path: Path, config: Path, overrides: Iterable[str],
                                     seed: int, steps: int) -> None:
    """The exact-resume check every task family gets: train `config` with `overrides` (which
    should checkpoint every few steps of a `steps`-step run) uninterrupted in-process; then as a
    real process SIGKILLed at a random moment (a draw of `seed`: after a random number of
    checkpointed steps, then a random delay), resumed to its end. Weights, optimizer states,
    metrics and summary must equal the uninterrupted run's."""
    import random

    arguments = [str(config), *sets(overrides)]
    with one_thread():
        straight = kdl("train", *arguments, "--runs-dir", tmp_path / "straight", "--quiet")
    assert straight.exit_code == 0, straight.stderr
    draw = random.Random(seed)
    runs = tmp_path / "killed"
    target = draw.randint(1, max(1, steps // 2))
    process = fork(runs, *arguments)
    step = 0
    while step < target and process.poll() is None:
        last = list(runs.glob("*/checkpoints/last.pt"))
        step = checkpointed_step(last[0]) if last else 0
        time.sleep(0.01)
    time.sleep(draw.uniform(0.0, 0.05))
    assert process.poll() is None, f"the run ended before its kill (seed {seed}): " + output(process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    folder = only_run(runs)
    killed_at = load_checkpoint(folder / "checkpoints" / "last.pt")["loop"]["step"]
    assert 0 < killed_at < steps, (seed, killed_at)
    resumed = fork(runs, "--resume", folder.name)
    assert resumed.wait(timeout=240) == 0, output(resumed)
    assert_same_training(folder, tmp_path / "straight" / straight.last_line)
