"""Reliability at the edges: a kill between any two of a run's file replacements, the start-up
window, changes applied by a resume, one process per run, temp files a kill left behind.

The kills use real `kdl train` processes that signal themselves just before the n-th os.replace
onto a named file (tests/kill_at.py); resumes run in-process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from kdl import TINY, kdl
from stopping import (
    RANDOM,
    assert_same_training,
    final_state,
    launch,
    only_run,
    output,
    read_json,
    sets,
    train,
    train_command,
)

import karpathy_runner.checkpoint
from karpathy_runner import runs as runs_module

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
    process = launch(runs, *args, kill_at=kill_at)
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
    processes = [launch(runs_dir / f"kill{i}", *train_command(*RANDOM),
                        kill_at=(name, n, "SIGKILL")) for i, (name, n) in enumerate(tail)]
    for i, process in enumerate(processes):
        assert process.wait(timeout=240) == -signal.SIGKILL, output(process)
        folder = only_run(runs_dir / f"kill{i}")
        temps = list(folder.rglob("*.tmp"))
        assert [t.name.split(".")[1] for t in temps] == [tail[i][0].split(".")[0]]  # left by the kill
        listed = json.loads(kdl("runs", "--runs-dir", runs_dir / f"kill{i}", "--json").stdout)
        assert listed[0]["status"] == "crashed", tail[i]
        resumed = train(runs_dir / f"kill{i}", resume=folder.name)
        assert resumed.exit_code == 0, (tail[i], resumed.stderr)
        assert_same_training(folder, baseline)
        meta = read_json(folder / "meta.json")
        assert meta["status"] == "completed" and meta["epochs_done"] == 2, tail[i]
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


def test_a_completed_run_without_its_summary_is_finished_by_resume(runs_dir, monkeypatch):
    """As an older kdl could leave it (meta.json completed, killed before summary.json)."""
    baseline, _ = replaced_files(monkeypatch)
    expected = read_json(baseline / "summary.json")
    (baseline / "summary.json").unlink()
    assert read_json(baseline / "meta.json")["status"] == "completed"
    resumed = train(baseline.parent, resume=baseline.name)
    assert resumed.exit_code == 0, resumed.stderr
    summary = read_json(baseline / "summary.json")
    assert summary["final"] == expected["final"] and summary["best"] == expected["best"]


def test_resume_repairs_a_best_pt_left_behind(runs_dir, monkeypatch):
    """An older kdl wrote last.pt before best.pt; a kill between them left best.pt an epoch
    behind the best epoch that last.pt names. The resume writes it again from last.pt."""
    stopped = train(runs_dir / "runs", *RANDOM, "train.epochs=1")
    folder = runs_dir / "runs" / stopped.last_line
    state = final_state(folder)
    assert state["loop"]["best_epoch"] == 1
    meta = read_json(folder / "meta.json")
    (folder / "meta.json").write_text(json.dumps({**meta, "status": "running", "pid": 2**22 + 7}))
    (folder / "checkpoints" / "best.pt").unlink()  # the best.pt of no epoch: behind last.pt
    resumed = kdl("train", "--resume", folder.name, "--runs-dir", runs_dir / "runs", "--quiet",
                  *sets(["train.epochs=2"]), "--allow-changes")
    assert resumed.exit_code == 0, resumed.stderr
    assert "best.pt repaired" in (folder / "train.log").read_text()
    assert final_state(folder, "best")["loop"]["epoch"] in (1, 2)


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
    real = karpathy_runner.checkpoint.atomic_write

    def full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(karpathy_runner.checkpoint, "atomic_write", full)
    result = train(runs_dir, *RANDOM)
    assert result.exit_code == 1
    assert "No checkpoint was written yet" in result.stderr and "intact" not in result.stderr
    monkeypatch.setattr(karpathy_runner.checkpoint, "atomic_write", real)
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
    processes = [launch(runs, *command) for _ in range(2)]
    codes = sorted(((p.wait(timeout=240), p) for p in processes), key=lambda item: item[0])
    (won, winner), (lost, loser) = codes
    assert (won, lost) == (0, 2), [output(p) for p in processes]
    assert f"in use by another kdl process (pid {winner.pid})" in output(loser)
    meta = read_json(folder / "meta.json")
    assert meta["pid"] == winner.pid and len(meta["resumes"]) == 1 and meta["epochs_done"] == 4


def test_rm_waits_for_no_one_and_removes_nothing_of_a_locked_run(runs_dir):
    runs = runs_dir / "runs"
    folder = runs / train(runs, *TINY, "train.epochs=1").last_line
    with runs_module.RunLock(folder).acquire():  # as a training process holds it
        result = kdl("rm", "--yes", folder.name, "--runs-dir", runs)
        assert result.exit_code == 2 and f"(pid {os.getpid()})" in result.stderr
        assert folder.is_dir()
    assert kdl("rm", "--yes", folder.name, "--runs-dir", runs).exit_code == 0
    assert not folder.exists()


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

    writer = threading.Thread(target=runs_module.atomic_write,
                              args=(folder / "eval.json", slow_write))
    writer.start()
    assert writing.wait(30)
    live = list(folder.glob(".eval.json.*.tmp"))
    runs_module.RunLock(folder).acquire().release()
    assert not stale.exists() and len(live) == 1 and live[0].exists()
    finish.set()
    writer.join()
    assert read_json(folder / "eval.json") == {"partial": True}
    assert not list(folder.rglob("*.tmp"))
