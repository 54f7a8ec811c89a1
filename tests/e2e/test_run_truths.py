"""What the run folder and the read commands tell: file modes a teammate can read, every eval kept
and the latest test numbers in the summary (so runs/show/compare sort by test.accuracy), the
elapsed time of a running run, a comparison readable at 80 columns, confusion tables labelled once."""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import json
import os
import stat
import threading
import time

import pytest
from kdl import CONFIGS, kdl, train_tiny
from runfolders import make_run

from karpathy_runner import plan
from karpathy_runner.config.loading import load_config
from karpathy_runner.runfolder import fsio, layout, locks
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.ui.tables import print_eval


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_run_files_get_the_umask_mode_not_mkstemp_0600(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        result = train_tiny(tmp_path, "--set", "train.epochs=1")
        assert result.exit_code == 0, result.stderr
        assert kdl("eval", result.last_line, "--runs-dir", tmp_path).exit_code == 0
    finally:
        os.umask(previous)
    folder = tmp_path / result.last_line
    replaced = ["config.yaml", "meta.json", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
                "eval/best-val.json", "metrics.jsonl"]
    modes = {name: stat.S_IMODE((folder / name).stat().st_mode) for name in replaced}
    assert modes == dict.fromkeys(replaced, mode)


def test_atomic_writes_never_set_the_umask(tmp_path, monkeypatch):
    """Reading the umask means setting it (os.umask): a file another thread made meanwhile (the
    training thread's, while the checkpoint thread writes) would get a umask of 0, writable by
    all. The kernel applies it to the mode asked for instead."""
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", None)
        fsio.atomic_write(tmp_path / "a.json", lambda handle: handle.write(b"{}"),
                          also=[tmp_path / "b.json"])
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("a.json", "b.json")} == {0o640}


def test_atomic_writes_step_over_a_temp_file_of_the_same_name(tmp_path, monkeypatch):
    """Temp names are this process's id and a count (no system call on the checkpoint
    thread); one a killed process with the same id left behind is stepped over, not written."""
    monkeypatch.setattr(fsio, "_TEMPS", itertools.count(7))
    left = tmp_path / f".a.json.{os.getpid()}-7.tmp"
    left.write_bytes(b"a killed writer's")
    fsio.atomic_write(tmp_path / "a.json", b"{}", also=[tmp_path / "b.json"])
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes() == b"{}"
    assert left.read_bytes() == b"a killed writer's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [left.name, "a.json", "b.json"]


def _eval_result(run_id: str, step: int, accuracy: float, split: str = "val") -> dict:
    return {"run": run_id, "checkpoint": "best", "split": split, "epoch": step // 10, "step": step,
            "samples": 100, "precision": "fp32", "evaluated_at": layout.utc_now(),
            "metrics": {"loss": 1 - accuracy, "accuracy": accuracy, "per_class_accuracy": {"0": 1.0}}}


def test_each_eval_is_kept_by_step_and_the_latest_per_split_reaches_the_summary(runs_dir):
    folder = make_run(runs_dir, status="running")
    writer = RunWriter(folder)
    writer.write_eval(_eval_result(folder.name, 40, 0.8))  # while the run is at epoch 4
    writer.write_eval(_eval_result(folder.name, 80, 0.9))  # and at epoch 8
    writer.write_eval(_eval_result(folder.name, 80, 0.95, split="test"))
    kept = sorted(p.name for p in (folder / "eval").iterdir())
    assert kept == ["best-test-step0000080.json", "best-test.json", "best-val-step0000040.json",
                    "best-val-step0000080.json", "best-val.json"]
    assert json.loads((folder / "eval/best-val-step0000040.json").read_text())["metrics"]["accuracy"] == 0.8
    assert json.loads((folder / "eval/best-val.json").read_text())["step"] == 80
    # the run ends after those evals: its final summary keeps them
    writer.finish("completed", None, 12.0, {"status": "completed", "epochs_done": 3, "steps": 30,
                                            "final": {"val.loss": 0.2}, "best": {}})
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final"] == {"val.loss": 0.2}
    assert summary["eval"]["val"]["step"] == 80 and summary["eval"]["val"]["metrics"]["accuracy"] == 0.9
    assert summary["eval"]["test"]["metrics"] == {"loss": pytest.approx(0.05), "accuracy": 0.95}


def test_test_accuracy_sorts_shows_and_compares(runs_dir):
    first, second, untested = make_run(runs_dir), make_run(runs_dir), make_run(runs_dir)
    RunWriter(first).write_eval(_eval_result(first.name, 30, 0.91, split="test"))
    RunWriter(second).write_eval(_eval_result(second.name, 30, 0.97, split="test"))
    listed = kdl("runs", "--sort", "test.accuracy")
    assert listed.exit_code == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[-1] == "test.accuracy"
    assert [line.split()[0] for line in lines[1:]] == [second.name, first.name, untested.name]
    assert lines[1].split()[-1] == "0.97" and lines[3].split()[-1] == "-"
    compared = json.loads(kdl("compare", first.name, second.name, "--json").stdout)
    assert [row["metrics"]["test.accuracy"] for row in compared["rows"]] == [0.91, 0.97]
    shown = kdl("show", second.name).stdout
    assert "eval test (best.pt, epoch 3): loss 0.03  accuracy 0.97" in shown


def test_a_running_run_shows_the_time_it_has_run(runs_dir):
    folder = make_run(runs_dir, status="running")
    meta = json.loads((folder / "meta.json").read_text())
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=3, seconds=5)
    meta.update(started_at=started.isoformat(timespec="seconds"), duration_s=0.0)
    (folder / "meta.json").write_text(json.dumps(meta))
    row = json.loads(kdl("runs", "--json").stdout)[0]
    assert 184 <= row["duration_s"] < 240
    assert " 3m0" in kdl("runs").stdout.splitlines()[1]
    # resumed a minute ago after 100 s of training before
    meta.update(duration_s=100.0, resumes=[{"at": (dt.datetime.now(dt.timezone.utc)
                                                   - dt.timedelta(seconds=60)).isoformat()}])
    (folder / "meta.json").write_text(json.dumps(meta))
    assert 159 <= json.loads(kdl("runs", "--json").stdout)[0]["duration_s"] < 220


def test_a_resumed_run_that_trains_shows_its_best_so_far_not_its_previous_ends(runs_dir):
    """Interrupted after epoch 1 (its summary.json says so), then resumed: while it trains, show
    and compare give the best of meta.json, which each checkpoint updates."""
    folder = make_run(runs_dir, [1.442])  # summary.json: best val.loss 1.442 at epoch 1
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(status="running", pid=os.getpid(), best={"metric": "val.loss", "mode": "min",
                                                       "value": 0.075, "epoch": 5})
    (folder / "meta.json").write_text(json.dumps(meta))
    shown = kdl("show", folder.name).stdout
    assert "best val.loss = 0.075 at epoch 5" in shown and "1.442 at epoch 1" not in shown
    compared = json.loads(kdl("compare", folder.name, "--json").stdout)
    assert compared["rows"][0]["metrics"]["best"] == 0.075


def test_confusion_rows_name_a_digit_once_and_a_named_class_with_its_index(capsys):
    result = {"run": "r", "checkpoint": "best", "epoch": 1, "split": "val", "samples": 4,
              "metrics": {"accuracy": 0.5, "confusion_matrix": [[1, 1], [1, 1]]}}
    print_eval({**result, "metrics": {**result["metrics"], "class_names": ["0", "1"]}})
    digits = capsys.readouterr().out.splitlines()
    print_eval({**result, "metrics": {**result["metrics"], "class_names": ["cat", "dog"]}})
    named = capsys.readouterr().out.splitlines()
    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.split("│")]

    assert [cells(line) for line in digits[-2:]] == [["0", "1", "1"], ["1", "1", "1"]]
    assert [cells(line) for line in named[-2:]] == [["0 cat", "1", "1"], ["1 dog", "1", "1"]]



def test_a_run_whose_process_ended_unreaped_is_crashed_not_running(runs_dir):
    """A killed run whose parent died with it is a zombie until init reaps it: it answers a
    signal 0 but runs nothing. kdl calls the run crashed, so a search or --skip-existing resumes
    it, instead of waiting on it as running."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # it has ended, and stays unreaped
        folder = make_run(runs_dir, status="running", pid=pid)
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "pid_started": layout.process_start_time(pid)}))
        assert json.loads(kdl("runs", "--json").stdout)[0]["status"] == "crashed"
    finally:
        os.waitpid(pid, 0)


def _another_machines_run(runs_dir, **meta: object):
    """A `running` run of a process on another machine (its pid cannot be looked up here)."""
    folder = make_run(runs_dir, status="running", pid=12345)
    written = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**written, "host": "node-a", **meta}))
    (folder / ".lock").write_text("12345")
    return folder


def _shown_status(folder) -> str:
    return {r["id"]: r["status"] for r in json.loads(kdl("runs", "--json").stdout)}[folder.name]


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_another_machines_run_is_running_while_its_heartbeat_beats_then_crashed(runs_dir):
    """Another machine's process is known by its heartbeat, the time of its run's .lock: fresh,
    the run is running; silent for STALE_BEATS beats (its job killed, its node lost), crashed,
    and a resume or --skip-existing takes it. A run of a kdl without the heartbeat (no
    heartbeat_s) is taken at its word, as before."""
    beating = _another_machines_run(runs_dir, heartbeat_s=15)
    assert _shown_status(beating) == "running"
    _age(beating / ".lock", layout.STALE_BEATS * 15 - 5)
    assert _shown_status(beating) == "running"
    _age(beating / ".lock", layout.STALE_BEATS * 15 + 5)
    assert _shown_status(beating) == "crashed"
    (beating / ".lock").unlink()
    assert _shown_status(beating) == "crashed"
    older = _another_machines_run(runs_dir)
    _age(older / ".lock", 3600)
    assert _shown_status(older) == "running"


def test_a_resume_of_a_run_another_machine_trains_names_the_machine_and_when_it_may_go_on(runs_dir):
    folder = _another_machines_run(runs_dir, heartbeat_s=15)
    refused = kdl("train", "--resume", folder.name)
    assert refused.exit_code == 2
    assert (f"run {folder.name} is still running (pid 12345 on node-a); stop it first. If that "
            "machine or its job died, the run reads crashed once its heartbeat has been silent for "
            "120 s: resume it then") in " ".join(refused.stderr.split())


def test_skip_existing_waits_for_a_run_another_machine_took_while_it_waited_for_the_lock(
        runs_dir, monkeypatch):
    """--skip-existing finds its config's run interrupted and takes the run's lock; by the time
    it holds it, another machine resumed the run (where locks are not shared between machines,
    both are granted) and beats. The run is not taken as done, nor resumed twice: the lock goes
    back, and the command waits until the run ends, then takes it as it ended."""
    cfg = load_config(CONFIGS / "digits_cnn.yaml", [])
    folder = make_run(runs_dir, status="interrupted")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "config_hash": cfg.hash()}))

    class ResumedElsewhereMeanwhile(locks.RunLock):
        def acquire(self, wait=None):
            held = super().acquire(wait)
            written = json.loads((folder / "meta.json").read_text())
            (folder / "meta.json").write_text(json.dumps({**written, "status": "running", "host": "node-a",
                                                          "pid": 12345, "heartbeat_s": 15}))
            return held

    said = []

    def wait(line: str) -> None:  # told once it waits: the other machine's run then completes
        said.append(line)
        written = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**written, "status": "completed"}))

    monkeypatch.setattr(plan, "RunLock", ResumedElsewhereMeanwhile)
    monkeypatch.setattr(plan, "ELSEWHERE_POLL_S", 0.01)
    run, held = plan._existing_run(runs_dir, cfg, wait)
    assert (run.id, run.status, held) == (folder.name, "completed", None)
    assert said == [f"run {folder.name} of this config is training (pid 12345 on node-a): waiting for "
                    "it to end, or for its heartbeat to stop, to take the run (--skip-existing)"]
    locks.RunLock(folder).acquire().release()  # the lock went back


def test_only_the_training_process_beats_a_process_that_takes_the_lock_to_look_does_not(tmp_path):
    """The heartbeat touches the .lock every beat from its own thread until stopped, never
    through a symlink put in its place; taking the lock (a --skip-existing that looks, a resume
    that refuses) leaves its time as it was, or it would keep a dead machine's run alive."""
    lock = tmp_path / ".lock"
    held = locks.RunLock(tmp_path).acquire()
    _age(lock, 600)
    held.release()
    locks.RunLock(tmp_path).acquire().release()
    assert time.time() - lock.stat().st_mtime > 590
    heartbeat = layout.Heartbeat(lock, every=0.05)
    try:
        assert time.time() - lock.stat().st_mtime < 5
        _age(lock, 600)
        deadline = time.monotonic() + 10
        while time.time() - lock.stat().st_mtime > 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.stat().st_mtime < 5  # beaten again, by the thread
    finally:
        heartbeat.stop()
    _age(lock, 600)
    time.sleep(0.2)
    assert time.time() - lock.stat().st_mtime > 590  # stopped: no more beats
    target = tmp_path / "elsewhere"
    target.write_text("")
    _age(target, 600)
    lock.unlink()
    lock.symlink_to(target)
    layout.Heartbeat(lock, every=60).stop()
    assert time.time() - target.stat().st_mtime > 590


def test_a_training_process_beats_while_it_trains_and_stops_as_it_ends(tmp_path, monkeypatch):
    """A fresh run and its resume each keep their .lock's time fresh while they train (aged
    here from another thread, and beaten fresh again), record the beat in meta.json, and stop
    beating as they end."""
    monkeypatch.setattr(layout, "HEARTBEAT_S", 0.05)
    beaten: list[bool] = []

    def age_then_watch(stop: threading.Event) -> None:
        while not stop.is_set() and not list(tmp_path.glob("2*/.lock")):
            time.sleep(0.005)
        if stop.is_set():
            return
        [lock] = tmp_path.glob("2*/.lock")
        _age(lock, 600)
        while not stop.is_set():
            if time.time() - lock.stat().st_mtime < 5:
                beaten.append(True)
                return
            time.sleep(0.005)

    for args in (["--set", "train.epochs=1"], None):
        stop = threading.Event()
        watcher = threading.Thread(target=age_then_watch, args=(stop,))
        watcher.start()
        if args is None:  # the resume, to epoch 2
            [folder] = tmp_path.glob("2*")
            _age(folder / ".lock", 600)
            result = kdl("train", "--resume", folder.name, "--set", "train.epochs=2", "--allow-changes",
                         "--runs-dir", tmp_path, "--quiet")
        else:
            result = train_tiny(tmp_path, *args)
        stop.set()
        watcher.join()
        assert result.exit_code == 0, result.stderr
        [folder] = tmp_path.glob("2*")
        assert json.loads((folder / "meta.json").read_text())["heartbeat_s"] == 0.05
        assert f"kdl-heartbeat {folder.name}" not in [t.name for t in threading.enumerate()]
    assert beaten == [True, True]


def test_a_runs_folder_on_a_file_system_without_locks_is_a_clear_error(tmp_path, monkeypatch):
    """Lustre mounted without -o flock answers flock with ENOSYS: not "held by another process"
    (pid unknown), but an exit 2 that says the file system has no locks and how to get them, and
    the run folder just made is taken away again."""
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    result = train_tiny(tmp_path / "runs", "--set", "train.epochs=1")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())
    assert "its file system does not lock files (Function not implemented)" in said
    assert "Mount it with file locks (Lustre: -o flock)" in said
    assert not any((tmp_path / "runs").iterdir())
