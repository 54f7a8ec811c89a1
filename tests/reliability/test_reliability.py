"""Reliability at the edges: a kill between any two of a run's file replacements, the start-up
window, changes applied by a resume, one process per run, temp files a kill left behind, and
checkpoint files (best.pt a hard link of last.pt, written in the background).

The kills use real `kdl train` processes (forked from the test's, stopping.fork) that signal
themselves just before the n-th os.replace onto a named file (tests/kill_at.py); resumes run
in-process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from kdl import TINY, kdl
from stopping import (
    RANDOM,
    assert_same_tensors,
    assert_same_training,
    final_state,
    fork,
    only_run,
    output,
    read_json,
    sets,
    train,
    train_command,
)

import karpathy_runner.runfolder.checkpoint
from karpathy_runner.errors import KdlError
from karpathy_runner.runfolder import fsio, locks
from karpathy_runner.runfolder.checkpoint import InBackground, captured, load_checkpoint
from karpathy_runner.tasks.classify import Classify

pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


def replaced_files(monkeypatch, *overrides: str) -> tuple[Path, list[str]]:
    """An uninterrupted in-process run and the names of the files it replaced, in order."""
    names: list[str] = []
    real = os.replace

    def replace(src, dst):
        names.append(os.path.basename(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    runs = Path(os.environ["KDL_RUNS_DIR"]) / "straight"
    result = train(runs, *overrides)
    monkeypatch.setattr(os, "replace", real)
    assert result.exit_code == 0, result.stderr
    return runs / result.last_line, names


def nth(names: list[str], index: int) -> tuple[str, int]:
    """(file name, how many times it had been replaced by then, this one included)."""
    return names[index], names[: index + 1].count(names[index])


def run_killed(runs: Path, kill_at: tuple[str, int, str], *args: str) -> tuple[int, Path]:
    process = fork(runs, *args, kill_at=kill_at)
    code = process.wait(timeout=240)
    return code, only_run(runs)


# ----------------------------------------------------------------------------- 1: the end


def test_a_kill_before_any_of_the_final_writes_resumes_to_the_same_files(runs_dir, monkeypatch):
    """SIGKILL before each of the last five replacements (best.pt, last.pt, meta.json at the last
    epoch's end; then summary.json and meta.json): each run resumes to the uninterrupted run's
    checkpoints, metrics and summary, and the temp file the kill left is cleared."""
    baseline, names = replaced_files(monkeypatch)
    tail = [nth(names, i) for i in range(len(names) - 5, len(names))]
    assert [name for name, _ in tail] == ["best.pt", "last.pt", "meta.json", "summary.json",
                                          "meta.json"]
    processes = [fork(runs_dir / f"kill{i}", *train_command(*RANDOM), kill_at=(name, n, "SIGKILL"))
                 for i, (name, n) in enumerate(tail)]
    for i, process in enumerate(processes):
        assert process.wait(timeout=240) == -signal.SIGKILL, output(process)
        folder = only_run(runs_dir / f"kill{i}")
        temps = list(folder.rglob("*.tmp"))
        # left by the kill: the temp file of the file about to be replaced (and before best.pt,
        # last.pt's: best.pt's is a hard link of it, both made before either is renamed)
        left = ["best", "last"] if tail[i][0] == "best.pt" else [tail[i][0].split(".")[0]]
        assert sorted(t.name.split(".")[1] for t in temps) == left
        listed = json.loads(kdl("runs", "--runs-dir", runs_dir / f"kill{i}", "--json").stdout)
        assert listed[0]["status"] == "crashed", tail[i]
        resumed = train(runs_dir / f"kill{i}", resume=folder.name)
        assert resumed.exit_code == 0, (tail[i], resumed.stderr)
        assert_same_training(folder, baseline)
        meta = read_json(folder / "meta.json")
        assert meta["status"] == "completed" and meta["epochs_done"] == 2, tail[i]
        # the best that kdl runs shows and a search tells its study: the checkpoint's
        assert meta["best"] == read_json(baseline / "meta.json")["best"], tail[i]
        assert not list(folder.rglob("*.tmp")), tail[i]


def test_sigint_during_the_final_writes_still_completes(runs_dir, monkeypatch):
    """Ctrl-C after the last epoch, before summary.json: the writes finish, the run completed."""
    baseline, names = replaced_files(monkeypatch)
    code, folder = run_killed(runs_dir / "runs", nth(names, names.index("summary.json")) + ("SIGINT",),
                              *train_command(*RANDOM))
    assert code == 0
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "completed" and meta["error"] is None
    assert read_json(folder / "summary.json")["final"] == read_json(baseline / "summary.json")["final"]


# ----------------------------------------------------------------------------- 2: start-up


@pytest.mark.parametrize("signum, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_before_the_first_step_leaves_an_interrupted_resumable_run(runs_dir, signum, code):
    """Between the folder's creation (config.yaml written) and its first meta.json: the run
    stops before its first step with a step-0 checkpoint and resumes to the same end."""
    baseline = train(runs_dir / "straight", *RANDOM)
    exit_code, folder = run_killed(runs_dir / "runs", ("meta.json", 1, signum), *train_command(*RANDOM))
    assert exit_code == code
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "interrupted", meta
    assert final_state(folder)["loop"]["step"] == 0
    resumed = train(runs_dir / "runs", resume=folder.name)
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_training(folder, runs_dir / "straight" / baseline.last_line)


def test_a_kill_before_the_first_checkpoint_resumes_from_step_0(runs_dir):
    baseline = train(runs_dir / "straight", *RANDOM)
    exit_code, folder = run_killed(runs_dir / "runs", ("last.pt", 1, "SIGKILL"), *train_command(*RANDOM))
    assert exit_code == -signal.SIGKILL and not (folder / "checkpoints" / "last.pt").exists()
    resumed = train(runs_dir / "runs", resume=folder.name)
    assert resumed.exit_code == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert_same_training(folder, runs_dir / "straight" / baseline.last_line)


def test_full_disk_before_the_first_checkpoint_promises_no_checkpoint(runs_dir, monkeypatch):
    real = karpathy_runner.runfolder.checkpoint.atomic_write

    def full(path, write, also=(), folder_fd=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(karpathy_runner.runfolder.checkpoint, "atomic_write", full)
    result = train(runs_dir, *RANDOM)
    assert result.exit_code == 1
    assert "No checkpoint was written yet" in result.stderr and "intact" not in result.stderr
    monkeypatch.setattr(karpathy_runner.runfolder.checkpoint, "atomic_write", real)
    resumed = train(runs_dir, resume=result.last_line)
    assert resumed.exit_code == 0, resumed.stderr
    assert read_json(runs_dir / result.last_line / "meta.json")["status"] == "completed"


# ----------------------------------------------------------------------------- 3: changes


@pytest.mark.parametrize("kill_at", [("config.yaml", 1), ("meta.json", 2)],
                         ids=["before config.yaml", "before the resume's meta.json"])
def test_a_kill_while_a_change_is_applied_leaves_it_pending_and_resume_completes_it(
        runs_dir, kill_at):
    runs = runs_dir / "runs"
    first = train(runs, *TINY, "train.epochs=1")
    folder = runs / first.last_line
    code, _ = run_killed(runs, (*kill_at, "SIGKILL"), "--resume", folder.name,
                         *sets(["train.epochs=2"]), "--allow-changes")
    assert code == -signal.SIGKILL
    meta = read_json(folder / "meta.json")
    assert meta["resumes"][-1]["changes"] == {"train.epochs": {"from": 1, "to": 2}}
    assert "pending_config" in meta  # recorded before it was applied
    resumed = train(runs, resume=folder.name)  # a plain resume completes the change
    assert resumed.exit_code == 0, resumed.stderr
    meta = read_json(folder / "meta.json")
    assert "pending_config" not in meta and meta["epochs_done"] == 2 and meta["epochs"] == 2
    assert "epochs: 2" in (folder / "config.yaml").read_text()
    assert meta["resumes"][0]["config_hash_before"] != meta["config_hash"]


# ----------------------------------------------------------------------------- 4: one writer


def test_two_resumes_at_once_one_trains_the_other_exits_2_naming_it(runs_dir):
    """Both start together from an interrupted run, both find it resumable; the lock lets one
    train while the other changes nothing and names the first one's pid."""
    runs = runs_dir / "runs"
    first = train(runs, *TINY, "train.epochs=1")
    folder = runs / first.last_line
    meta = read_json(folder / "meta.json")
    (folder / "meta.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    command = ["--resume", folder.name, *sets(["train.epochs=4"]), "--allow-changes"]
    processes = [fork(runs, *command) for _ in range(2)]
    codes = sorted(((p.wait(timeout=240), p) for p in processes), key=lambda item: item[0])
    (won, winner), (lost, loser) = codes
    assert (won, lost) == (0, 2), [output(p) for p in processes]
    assert f"in use by another kdl process (pid {winner.pid})" in output(loser)
    meta = read_json(folder / "meta.json")
    assert meta["pid"] == winner.pid and len(meta["resumes"]) == 1 and meta["epochs_done"] == 4


def test_rm_waits_for_no_one_and_removes_nothing_of_a_locked_run(runs_dir):
    runs = runs_dir / "runs"
    folder = runs / train(runs, *TINY, "train.epochs=1").last_line
    with locks.RunLock(folder).acquire():  # as a training process holds it
        result = kdl("rm", "--yes", folder.name, "--runs-dir", runs)
        assert result.exit_code == 2 and f"(pid {os.getpid()})" in result.stderr
        assert folder.is_dir()
    assert kdl("rm", "--yes", folder.name, "--runs-dir", runs).exit_code == 0
    assert not folder.exists()


def test_a_claim_removed_as_it_is_let_go_is_never_held_twice(tmp_path):
    """A claim's file goes with its holder's release. The process that waited for it then holds
    the lock of a removed file: it must take the file now at the path, or a third process making
    a new one would hold the claim beside it. (Two descriptors of one file lock each other as two
    processes do: threads stand in for them.)"""
    path = tmp_path / "abc.lock"
    first = locks.Lock(path, "config abc", transient=True).acquire()
    waiting, taken = threading.Event(), threading.Event()
    second = locks.Lock(path, "config abc", transient=True)
    waiter = threading.Thread(target=lambda: (second.acquire(lambda pid: waiting.set()), taken.set()))
    waiter.start()
    assert waiting.wait(30)
    time.sleep(0.2)  # into its wait
    first.release()
    assert taken.wait(30)
    with pytest.raises(KdlError, match=rf"config abc is in use by another kdl process \(pid {os.getpid()}\)"):
        locks.Lock(path, "config abc", transient=True).acquire()  # a third: the second holds it
    second.release()
    waiter.join()
    assert not path.exists()
    locks.Lock(path, "config abc", transient=True).acquire().release()


# ----------------------------------------------------------------------------- 5: temp files


def test_stale_temp_files_are_removed_but_not_a_live_writers(tmp_path):
    """A kill's leftover goes when the run is locked; a temp file another process (here a
    thread, as `kdl eval` would) is still writing stays, and its write completes."""
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    stale = folder / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    writing, finish = threading.Event(), threading.Event()

    def slow_write(handle):
        handle.write(b'{"partial": ')
        writing.set()
        finish.wait(30)
        handle.write(b"true}")

    writer = threading.Thread(target=fsio.atomic_write,
                              args=(folder / "eval.json", slow_write))
    writer.start()
    assert writing.wait(30)
    live = list(folder.glob(".eval.json.*.tmp"))
    locks.RunLock(folder).acquire().release()
    assert not stale.exists() and len(live) == 1 and live[0].exists()
    finish.set()
    writer.join()
    assert read_json(folder / "eval.json") == {"partial": True}
    assert not list(folder.rglob("*.tmp"))


# ----------------------------------------------------------------------------- 5: checkpoint files


def test_best_pt_shares_the_file_of_its_last_pt_until_last_pt_moves_on(runs_dir, monkeypatch):
    """An improved epoch's checkpoint is written once, renamed into place as best.pt and (the
    same file, a hard link) last.pt; the next epoch's last.pt is a new file, so best.pt keeps
    the best epoch's bytes. (lr 1e-12: no later epoch is better than the first.)"""
    renamed: list[tuple[str, int]] = []  # (name, inode) of each checkpoint renamed into place
    real = os.replace

    def replace(src, dst):
        if Path(dst).suffix == ".pt":
            renamed.append((Path(dst).name, os.stat(src).st_ino))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = train(runs_dir, "train.epochs=2", "optimizer.lr=1e-12", "model.batch_norm=false",
                   "model.dropout=0", "train.checkpoint_every_steps=null")
    assert result.exit_code == 0, result.stderr
    folder = runs_dir / result.last_line
    best = folder / "checkpoints" / "best.pt"
    assert [name for name, _ in renamed] == ["best.pt", "last.pt", "last.pt"]
    assert renamed[0][1] == renamed[1][1] != renamed[2][1]
    assert best.stat().st_ino == renamed[0][1] and best.stat().st_nlink == 1
    assert final_state(folder, "best")["loop"]["epoch"] == 1
    assert final_state(folder, "last")["loop"]["epoch"] == 2


def test_without_hard_links_best_pt_is_a_copy(runs_dir, monkeypatch):
    """On a file system without hard links best.pt is a second file with the same bytes."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    result = train(runs_dir, "train.epochs=1", "train.checkpoint_every_steps=null")
    assert result.exit_code == 0, result.stderr
    folder = runs_dir / result.last_line
    best, last = folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt"
    assert not best.samefile(last) and best.stat().st_nlink == last.stat().st_nlink == 1
    assert best.read_bytes() == last.read_bytes()
    assert not list(folder.rglob("*.tmp"))


def test_checkpoints_are_written_while_training_goes_on_with_the_state_of_their_step(
        runs_dir, monkeypatch):
    """Each checkpoint is serialised by torch.save on the checkpoint thread, held there until the
    training thread has done a step more, and still holds the state of its own step, bit for bit
    as a run that holds nothing writes it."""
    def saves(runs: Path, hold_below: int = 0) -> list[tuple[str, bool, int, dict]]:
        """The checkpoints a run writes, each held until training moves on if its step is below
        `hold_below` (the last step: no step follows it to wait for)."""
        progress, saved = {"step": 0}, []
        original, module = Classify.train_step, karpathy_runner.runfolder.checkpoint
        real_write, real_serialise = module.atomic_write, module.serialise

        def until_training_moves_on(step: int) -> None:
            deadline = time.monotonic() + 3
            while step < hold_below and progress["step"] <= step and time.monotonic() < deadline:
                time.sleep(0.005)

        def train_step(self, batch, step, updater):
            result = original(self, batch, step, updater)
            progress["step"] = step + 1
            return result

        def serialise(state):
            until_training_moves_on(state["loop"]["step"])
            return real_serialise(state)

        def atomic_write(path, data, also=(), folder_fd=None):
            real_write(path, data, also, folder_fd)
            state = load_checkpoint(path)
            saved.append((threading.current_thread().name, progress["step"] > state["loop"]["step"],
                           state["loop"]["step"], state["models"]))

        with monkeypatch.context() as patch:
            patch.setattr(Classify, "train_step", train_step)
            patch.setattr(module, "atomic_write", atomic_write)
            patch.setattr(module, "serialise", serialise)
            result = train(runs)
        assert result.exit_code == 0, result.stderr
        return saved

    free = saves(runs_dir / "free")
    assert [step for *_, step, _ in free] == [4, 8, 12, 16, 20, 21, 24, 28, 32, 36, 40, 42]
    held = saves(runs_dir / "held", hold_below=42)
    assert {thread for thread, *_ in held} == {"kdl-checkpoint"}
    assert [moved_on for _, moved_on, *_ in held] == [True] * (len(held) - 1) + [False]  # the end
    assert [step for *_, step, _ in held] == [step for *_, step, _ in free]
    for (*_, step, models), (*_, _, expected) in zip(held, free, strict=True):
        assert_same_tensors(models, expected, f"step {step}")


def test_a_kill_while_a_checkpoint_is_written_in_the_background_keeps_the_one_before(runs_dir):
    """SIGKILL from the checkpoint thread just before its step-12 last.pt replaces the step-8
    one, as training goes on: last.pt is the complete step-8 file and the run resumes to the
    uninterrupted run's end."""
    baseline = train(runs_dir / "straight")
    process = fork(runs_dir / "runs", *train_command(*RANDOM), kill_at=("last.pt", 3, "SIGKILL"))
    assert process.wait(timeout=240) == -signal.SIGKILL, output(process)
    assert "kill_at: last.pt 3 in thread kdl-checkpoint" in output(process)
    folder = only_run(runs_dir / "runs")
    assert final_state(folder)["loop"]["step"] == 8
    assert [t.name.split(".")[1] for t in folder.rglob("*.tmp")] == ["last"]
    assert json.loads(kdl("runs", "--runs-dir", runs_dir / "runs", "--json").stdout)[0]["status"] == "crashed"
    resumed = train(runs_dir / "runs", resume=folder.name)
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_training(folder, runs_dir / "straight" / baseline.last_line)


def test_ctrl_c_while_a_checkpoint_is_written_stops_only_once_it_is_done():
    """The training thread waits for the checkpoint thread through a Ctrl-C, then stops: the
    run folder is never written by both at once."""
    saving, release, done = InBackground(), threading.Event(), []

    def job():
        release.wait(30)
        time.sleep(0.05)
        done.append(True)

    def ctrl_c_then_release():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        release.set()

    saving.start(job)
    threading.Timer(0.1, ctrl_c_then_release).start()
    with pytest.raises(KeyboardInterrupt):
        saving.wait()
    assert done == [True]


def test_the_checkpoint_thread_lets_go_of_a_job_before_wait_returns_and_is_joined_by_close():
    """A job's state (its copied tensors) is freed by the checkpoint thread before `wait`
    returns, and `close` joins the thread: a tensor freed by a thread the exiting interpreter
    stops aborts the process (`terminate called without an active exception`)."""
    saving, state = InBackground(), torch.zeros(3)
    freed = weakref.ref(state)

    def job(state=state):
        state.add_(1)

    saving.start(job)
    del job, state
    saving.wait()
    assert freed() is None
    thread = saving._thread
    saving.close()
    assert thread is not None and not thread.is_alive()


def test_a_captured_state_is_a_copy_shaped_like_the_state():
    """What the checkpoint thread serialises: the tensors copied (a later in-place update does
    not reach them), a tensor held twice still one, state dicts with their module versions."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    state = {"models": {"model": model.state_dict()}, "tied": [model[0].weight] * 2,
             "rng": (3, (1, 2), None)}
    copied = captured(state)
    with torch.no_grad():
        model[0].weight.add_(1)
    assert not torch.equal(copied["models"]["model"]["0.weight"], model[0].weight)
    assert torch.equal(copied["models"]["model"]["0.weight"], copied["tied"][0])
    assert copied["tied"][0] is copied["tied"][1] and copied["rng"] == state["rng"]
    assert copied["models"]["model"]._metadata == state["models"]["model"]._metadata
