"""Signals, kills, atomic files, full disks, non-finite losses and parallel launches.

In-process runs are stopped at an exact step by raising the signal from inside the step; the
kills and the Ctrl-C of a whole process group use real `kdl train` processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from kdl import kdl
from stopping import (
    RANDOM,
    STEPS_PER_EPOCH,
    assert_same_training,
    final_state,
    fork,
    launch,
    metrics,
    only_run,
    output,
    read_json,
    segment_command,
    signal_at,
    train,
    train_command,
    wait_for,
)

import karpathy_runner.runfolder.checkpoint
from karpathy_runner.data import BatchDataset, Batches
from karpathy_runner.runfolder import fsio, layout
from karpathy_runner.runfolder.checkpoint import load_checkpoint
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.signals import Stop
from karpathy_runner.tasks.classify import Classify

pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as jq and most non-Python readers do."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


# ----------------------------------------------------------------------------- signals


def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path, monkeypatch):
    signal_at(monkeypatch, [10], signal.SIGTERM)
    result = train(tmp_path)
    assert result.exit_code == 143, result.stderr
    folder = tmp_path / result.last_line
    assert read_json(folder / "meta.json")["status"] == "interrupted"
    assert final_state(folder)["loop"]["step"] == 10
    assert [r["step"] for r in metrics(folder)] == [3, 6, 9]  # flushed, none lost
    assert "received SIGTERM" in (folder / "train.log").read_text()
    listed = json.loads(kdl("runs", "--runs-dir", tmp_path, "--json").stdout)
    assert listed[0]["status"] == "interrupted"


class _SignalMidWrite:
    """train.log's handle, made to receive SIGTERM halfway through writing a line (a signal
    handler runs between any two bytecodes of the main thread: inside a write too)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text: str) -> int:
        half = len(text) // 2
        self.handle.write(text[:half])
        signal.raise_signal(signal.SIGTERM)  # its handler runs here, with the line half written
        return self.handle.write(text[half:])

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


def test_a_signal_in_the_middle_of_a_train_log_line_is_only_recorded(tmp_path, monkeypatch):
    """The handler writes nothing: the line being written stays whole, the loop logs the signal
    on a line of its own once the step is done, and the run ends interrupted with its
    checkpoint."""
    original = RunWriter.log

    def log(self, line):
        if line.startswith("epoch 1/") and self._log is not None:
            self._log = _SignalMidWrite(self._log)
            try:
                return original(self, line)
            finally:
                self._log = self._log.handle
        return original(self, line)

    monkeypatch.setattr(RunWriter, "log", log)
    result = train(tmp_path)
    assert result.exit_code == 143, result.stderr
    folder = tmp_path / result.last_line
    lines = (folder / "train.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), lines
    epoch_line = next(line for line in lines if " epoch 1/" in line)
    assert "received" not in epoch_line and epoch_line.split(" ", 2)[2].startswith("epoch 1/2  train.loss")
    assert sum("received SIGTERM: stopping after this step" in line for line in lines) == 1
    assert read_json(folder / "meta.json")["status"] == "interrupted"
    assert final_state(folder)["loop"]["step"] == STEPS_PER_EPOCH


def test_second_sigint_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Two Ctrl-C in step 10: no new checkpoint (the last one, step 8, is untouched); resuming
    from it ends exactly where an uninterrupted run ends, even after a kill mid-write left a
    truncated last line in metrics.jsonl."""
    baseline = tmp_path / "straight" / train(tmp_path / "straight").last_line
    saved = {}
    original = Classify.train_step

    def remember_step_8(self, batch, step, updater):
        if step == 8:  # step 8 is done; its checkpoint is on its way to the disk
            last = next((tmp_path / "runs").glob("*/checkpoints/last.pt"))
            wait_for(lambda: load_checkpoint(last)["loop"]["step"] == 8)
            saved["digest"] = digest(last)
        return original(self, batch, step, updater)

    monkeypatch.setattr(Classify, "train_step", remember_step_8)
    signal_at(monkeypatch, [10], signal.SIGINT, times=2)
    result = train(tmp_path / "runs")
    assert result.exit_code == 130, result.stderr
    folder = only_run(tmp_path / "runs")
    last = folder / "checkpoints" / "last.pt"
    assert digest(last) == saved["digest"] and final_state(folder)["loop"]["step"] == 8
    assert read_json(folder / "meta.json")["status"] == "interrupted"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temp file left

    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "epoch": 1, "split": "tr')  # a record cut short by a kill
    shown = kdl("show", folder.name, "--runs-dir", tmp_path / "runs")
    assert shown.exit_code == 0, shown.stderr
    assert kdl("runs", "--runs-dir", tmp_path / "runs").exit_code == 0

    monkeypatch.setattr(Classify, "train_step", original)
    resumed = train(tmp_path / "runs", resume=folder.name)
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_training(folder, baseline)


def test_ctrl_c_to_the_process_group_with_dataloader_workers(tmp_path):
    """A terminal's Ctrl-C reaches the workers too: they leave it to the main process, which
    finishes its step, saves, says so once and exits 130."""
    runs = tmp_path / "runs"
    process = fork(runs, *train_command("model.channels=[8,16]", "train.device=cpu",
                                        "train.epochs=50", "data.num_workers=2",
                                        "data.placement=stream"),
                   start_new_session=True)
    try:
        wait_for(lambda: any(runs.glob("*/checkpoints/last.pt")) or process.poll() is not None)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 130, output(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    folder = only_run(runs)
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "interrupted" and meta["error"] is None, output(process)
    log = (folder / "train.log").read_text()
    assert log.count("received SIGINT") == 1, log
    step = load_checkpoint(folder / "checkpoints" / "last.pt")["loop"]["step"]
    assert step == meta["step"] > STEPS_PER_EPOCH
    assert output(process).strip().splitlines()[-1] == folder.name


def test_dataloader_workers_ignore_interrupts(tmp_path):
    """Under the trainer's handlers, a worker that gets SIGINT or SIGTERM (it inherited the
    handlers when forked) keeps serving batches, and neither stops the run nor logs into it."""

    class Interrupting(BatchDataset):
        def __len__(self):
            return 8

        def get_batch(self, indices):
            if torch.utils.data.get_worker_info() is not None:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
            return (indices.clone(),)

    stop = Stop()
    with stop.installed():
        stop.in_loop = True
        batches = [b for (b,) in Batches(Interrupting(), 2, num_workers=2).epoch()]
    assert torch.cat(batches).tolist() == list(range(8))
    assert stop.signum is None and stop.heard() is None


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_sigkill_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path, task):
    """Kill a real `kdl train` three times in a row at random moments (a seeded draw: a few
    checkpoints into each process, then a random delay), resuming each time. Meanwhile the test
    keeps loading last.pt and runs `kdl eval` on the training run: every read finds a complete
    checkpoint. After each kill `kdl runs` says crashed; the run ends with the uninterrupted
    run's weights and metrics. For each task: digits classified, shapes segmented."""
    # 3 kills use at most 3 * (16 + a few) steps of them, and the second process trains on while
    # the test evaluates it: room enough that it is never done before its kill
    total = 8 * STEPS_PER_EPOCH
    command = (train_command(*RANDOM, "train.epochs=8") if task == "classify"
               else segment_command(tmp_path / "shapes", "train.epochs=8"))
    baseline = kdl("train", *command, "--runs-dir", tmp_path / "straight", "--quiet")
    assert baseline.exit_code == 0, baseline.stderr
    runs = tmp_path / "runs"
    draw = random.Random(20240601)
    process = fork(runs, *command)
    step, kills, evals = 0, 0, 0
    while kills < 3:
        target = step + draw.randint(4, 16)
        while step < target and process.poll() is None:
            last = list(runs.glob("*/checkpoints/last.pt"))
            step = load_checkpoint(last[0])["loop"]["step"] if last else 0  # never a partial file
            if kills == 1 and step and evals < 2:
                evaluated = kdl("eval", "latest", "--checkpoint", "last", "--runs-dir", runs, "--json")
                assert evaluated.exit_code == 0, evaluated.stderr
                assert json.loads(evaluated.stdout)["step"] <= total
                evals += 1
            time.sleep(0.01)
        time.sleep(draw.uniform(0.0, 0.05))  # a few steps: anywhere in a checkpoint's cycle
        assert process.poll() is None, "the run ended before it could be killed: " + output(process)
        process.kill()
        process.wait()
        kills += 1
        folder = only_run(runs)
        assert read_json(folder / "meta.json")["status"] == "running"
        assert json.loads(kdl("runs", "--runs-dir", runs, "--json").stdout)[0]["status"] == "crashed"
        step = load_checkpoint(folder / "checkpoints" / "last.pt")["loop"]["step"]
        assert 0 < step < total
        process = fork(runs, "--resume", folder.name)
    assert process.wait(timeout=120) == 0, output(process)
    assert evals == 2
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "completed" and len(meta["resumes"]) == 3
    # the evals made while it trained are still in its final summary
    assert read_json(folder / "summary.json")["eval"]["val"]["checkpoint"] == "last"
    assert_same_training(folder, tmp_path / "straight" / baseline.last_line)


# ----------------------------------------------------------------------------- files


def test_every_replaced_file_is_written_beside_fsynced_and_renamed(tmp_path, monkeypatch):
    """Each file is renamed into place from a temp file beside it whose bytes (its inode: a
    hard link shares them) were fsynced before; the folder is fsynced after the rename."""
    events: list[tuple] = []
    real_replace, real_fsync = os.replace, os.fsync

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino, os.readlink(f"/proc/self/fd/{fd}"),
                       threading.current_thread().name))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, src, dst, threading.current_thread().name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    result = train(tmp_path, "train.epochs=1")
    assert result.exit_code == 0
    assert kdl("eval", "latest", "--runs-dir", tmp_path).exit_code == 0
    folder = tmp_path / result.last_line
    for target in ("checkpoints/last.pt", "checkpoints/best.pt", "meta.json", "summary.json",
                   "eval/best-val.json", "config.yaml"):
        path = folder / target
        renames = [e for e in events if e[0] == "replace" and e[3] == path]
        assert renames, f"{target} was not renamed into place"
        for rename in renames:
            temp, inode, at = Path(rename[2]), rename[1], events.index(rename)
            assert temp.parent == path.parent and temp.name.startswith(f".{path.name}.")
            assert any(e[:2] == ("fsync", inode) for e in events[:at]), f"{temp} not fsynced"
            # the next folder that thread fsyncs is this file's (after any more renames there)
            folders = [e[2] for e in events[at:] if e[0] == "fsync" and e[3] == rename[4]
                       and Path(e[2]).is_dir()]
            assert folders[:1] == [str(path.parent)], f"{target}: its folder not fsynced next"
    # the metrics a checkpoint carries on from are on disk before it
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[3].name == "last.pt"]
    for before, at in zip([0, *renames], renames, strict=False):
        assert ("fsync", str(folder / "metrics.jsonl")) in [(e[0], e[2]) for e in events[before:at]]
    assert not list(folder.rglob("*.tmp"))


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real = karpathy_runner.runfolder.checkpoint.atomic_write
    seen = {"calls": 0}

    def atomic_write(path, write, also=(), folder_fd=None):
        seen["calls"] += 1
        if seen["calls"] < 3:  # steps 4 and 8 are written; step 12 meets a full disk
            return real(path, write, also, folder_fd)
        seen["previous"], seen["thread"] = digest(path), threading.current_thread().name

        def half_then_full(handle):
            handle.write(b"\x80\x02partial checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half_then_full, also, folder_fd)

    monkeypatch.setattr(karpathy_runner.runfolder.checkpoint, "atomic_write", atomic_write)
    result = train(tmp_path)
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert "The previous checkpoint is intact" in result.stderr and "Traceback" not in result.stderr
    (command,) = re.findall(r"continue with `(kdl train --resume [^`]+)`", " ".join(result.stderr.split()))
    assert seen["thread"] == "kdl-checkpoint"  # written in the background: failed at the next wait
    folder = tmp_path / result.last_line
    last = folder / "checkpoints" / "last.pt"
    assert digest(last) == seen["previous"] and final_state(folder)["loop"]["step"] == 8
    assert not list(folder.rglob("*.tmp"))
    assert read_json(folder / "meta.json")["status"] == "failed"

    monkeypatch.setattr(karpathy_runner.runfolder.checkpoint, "atomic_write", real)
    resumed = kdl(*command.split()[1:], "--quiet")  # space freed: the run continues as it said
    assert resumed.exit_code == 0 and read_json(folder / "meta.json")["status"] == "completed"
    baseline = train(tmp_path / "straight")
    assert_same_training(folder, tmp_path / "straight" / baseline.last_line)


def test_full_disk_at_the_last_checkpoint_fails_the_run_at_its_end(tmp_path, monkeypatch):
    """The end of training waits for the checkpoint being written, and fails the run with its
    error: epoch 2's write meets a full disk, epoch 1's checkpoint stays."""
    real = karpathy_runner.runfolder.checkpoint.atomic_write

    def full_at_epoch_2(path, write, also=(), folder_fd=None):
        if path.exists():  # epoch 1's last.pt is there: this is epoch 2's
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write, also, folder_fd)

    monkeypatch.setattr(karpathy_runner.runfolder.checkpoint, "atomic_write", full_at_epoch_2)
    result = train(tmp_path, "train.checkpoint_every_steps=null")
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr and "The previous checkpoint is intact" in result.stderr
    assert "Traceback" not in result.stderr
    folder = tmp_path / result.last_line
    assert read_json(folder / "meta.json")["status"] == "failed"
    assert final_state(folder)["loop"]["epoch"] == 1


def test_full_disk_when_updating_meta_is_a_clear_failure(tmp_path, monkeypatch):
    real = fsio.atomic_write

    def atomic_write(path, data, also=(), folder_fd=None):
        if Path(path).name == "meta.json" and json.loads(bytes(data)).get("epochs_done"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data, also, folder_fd)

    monkeypatch.setattr(fsio, "atomic_write", atomic_write)
    result = train(tmp_path)
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert "meta.json" in result.stderr and "--resume" in result.stderr
    assert final_state(tmp_path / result.last_line)["loop"]["epoch"] == 1
    # the writer's threads ended all the same: no heartbeat keeps the failed run alive
    assert f"kdl-heartbeat {result.last_line}" not in [t.name for t in threading.enumerate()]


def test_unwritable_runs_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = train(blocker / "runs")
    assert result.exit_code == 2
    assert "cannot create the runs folder" in result.stderr and "--runs-dir" in result.stderr
    assert blocker.read_text() == "not a folder"


# ----------------------------------------------------------------------------- numerical faults


def nan_loss_at(monkeypatch, step: int) -> None:
    """Make the model's output NaN during step `step` (counted from 1)."""
    original = Classify.train_step

    def train_step(self, batch, at, updater):
        if at + 1 != step:
            return original(self, batch, at, updater)
        model = self.models["model"]
        forward = model.forward
        model.forward = lambda x: forward(x) * float("nan")
        try:
            return original(self, batch, at, updater)
        finally:
            del model.forward

    monkeypatch.setattr(Classify, "train_step", train_step)


def test_weights_made_nonfinite_by_an_epochs_last_update_are_never_checkpointed(tmp_path, monkeypatch):
    """The last update of epoch 1 puts an inf into the model's last parameter while every loss
    stayed finite: the epoch's checkpoint is refused, and last.pt stays step 20's."""
    original = Classify.train_step

    def train_step(self, batch, at, updater):
        result = original(self, batch, at, updater)
        if at + 1 == STEPS_PER_EPOCH:
            with torch.no_grad():
                list(self.models["model"].parameters())[-1].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(Classify, "train_step", train_step)
    result = train(tmp_path)
    assert result.exit_code == 1
    assert f"the weights became non-finite (NaN or inf) at step {STEPS_PER_EPOCH}, epoch 1" in result.stderr
    assert "Traceback" not in result.stderr
    state = final_state(tmp_path / result.last_line)
    assert state["loop"]["step"] == 20
    assert all(torch.isfinite(t).all() for t in state["models"]["model"].values())


def test_a_nonfinite_step_is_named_with_its_epoch_after_a_resume_with_another_batch_size(
        tmp_path, monkeypatch):
    """Epoch 1 in batches of 64 (21 steps), epoch 2 resumed in batches of 128 (11 steps): the
    inf the last update of epoch 2 makes is at step 32, epoch 2, as the loop counts it (steps
    over batches per epoch would say epoch 3)."""
    first = train(tmp_path, "train.epochs=1")
    assert first.exit_code == 0, first.stderr
    original = Classify.train_step

    def train_step(self, batch, at, updater):
        result = original(self, batch, at, updater)
        if at + 1 == STEPS_PER_EPOCH + 11:
            with torch.no_grad():
                list(self.models["model"].parameters())[-1].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(Classify, "train_step", train_step)
    resumed = kdl("train", "--resume", first.last_line, "--runs-dir", tmp_path, "--quiet",
                  "--set", "train.epochs=2", "--set", "data.batch_size=128", "--allow-changes")
    assert resumed.exit_code == 1
    assert f"the weights became non-finite (NaN or inf) at step {STEPS_PER_EPOCH + 11}, epoch 2" \
        in resumed.stderr, resumed.stderr


def test_nan_loss_stops_the_run_and_keeps_finite_checkpoints(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, STEPS_PER_EPOCH + 5)
    original, digests = Classify.train_step, {}

    def remember(self, batch, at, updater):
        if at + 1 == STEPS_PER_EPOCH + 5:  # the checkpoints as they were before the bad step
            folder = only_run(tmp_path)
            # (the one of step 24, every 4 steps, may still be on its way to the disk)
            wait_for(lambda: final_state(folder)["loop"]["step"] == 24)
            digests.update({p.name: digest(p) for p in (folder / "checkpoints").glob("*.pt")})
        return original(self, batch, at, updater)

    monkeypatch.setattr(Classify, "train_step", remember)
    result = train(tmp_path)
    assert result.exit_code == 1
    assert f"step {STEPS_PER_EPOCH + 5}, epoch 2" in result.stderr
    assert "on_nonfinite" in result.stderr and "Traceback" not in result.stderr
    folder = tmp_path / result.last_line
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "failed" and f"step {STEPS_PER_EPOCH + 5}" in meta["error"]
    assert set(digests) == {"last.pt", "best.pt"}
    for name, before in digests.items():
        assert digest(folder / "checkpoints" / name) == before, name
        state = load_checkpoint(folder / "checkpoints" / name)
        assert all(torch.isfinite(t).all() for t in state["models"]["model"].values())
    strict_json((folder / "summary.json").read_text())


def test_skip_step_skips_the_nan_step_and_completes(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, 5)
    result = train(tmp_path, "train.on_nonfinite=skip_step")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / result.last_line
    summary = strict_json((folder / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["status"] == "completed"
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        strict_json(line)  # the skipped step left no NaN in the metrics
    state = final_state(folder)
    assert all(torch.isfinite(t).all() for t in state["models"]["model"].values())


# ----------------------------------------------------------------------------- parallel launches


def test_parallel_launches_get_distinct_folders_and_all_complete(tmp_path):
    """Three real processes started together (bench/parallel_launch.py starts 32: 163 s here)."""
    runs, n = tmp_path / "runs", 3
    processes = [launch(runs, *train_command("model.channels=[4]", "train.device=cpu",
                                             "train.max_steps=2", "train.checkpoint_every_steps=1",
                                             "data.batch_size=256", f"seed={i}"))
                 for i in range(n)]
    codes = [p.wait(timeout=240) for p in processes]
    assert codes == [0] * n, [output(p) for p in processes]
    ids = [output(p).strip().splitlines()[-1] for p in processes]
    assert len(set(ids)) == n and sorted(ids) == sorted(p.name for p in runs.iterdir())
    for run_id, process in zip(ids, processes, strict=True):
        meta = read_json(runs / run_id / "meta.json")
        assert (meta["status"], meta["id"], meta["pid"]) == ("completed", run_id, process.pid)
        assert [r["step"] for r in metrics(runs / run_id) if r["split"] != "train"] == [2, 2]
        for which in ("last", "best"):
            load_checkpoint(runs / run_id / "checkpoints" / f"{which}.pt")
    assert not list(runs.rglob("*.tmp"))
    listed = json.loads(kdl("runs", "--runs-dir", runs, "--json").stdout)
    assert sorted(r["id"] for r in listed) == sorted(ids)


def test_run_ids_never_collide_even_when_the_random_part_does(tmp_path, monkeypatch):
    """32 folders for one name in the same second from a pool of 40 random parts: collisions
    happen, and the atomic mkdir turns each into a retry."""
    pool = random.Random(0)
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: f"{pool.randrange(40):06x}")
    folders: list[Path] = []
    barrier = threading.Barrier(8)

    def create():
        barrier.wait()
        for _ in range(4):
            folders.append(layout.create_run_folder(tmp_path, "same"))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(folders) == 32 and len(set(folders)) == 32
    assert all((f / "checkpoints").is_dir() for f in folders)
