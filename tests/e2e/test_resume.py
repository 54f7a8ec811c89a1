"""Exact resume: a run stopped at any step and resumed with `kdl train --resume RUN` ends with the
weights, optimizer state and metrics of the same run left uninterrupted, bit for bit (CPU,
train.deterministic: true)."""

from __future__ import annotations

import json
import signal

import pytest
from kdl import CONFIGS, kdl
from stopping import (
    RANDOM,
    STEPS_PER_EPOCH,
    assert_same_training,
    final_state,
    metrics,
    only_run,
    read_json,
    segment_command,
    sets,
    signal_at,
    stopped_and_resumed,
    train,
)

from karpathy_runner.tasks.classify import Classify
from karpathy_runner.tasks.segment import Segment

SCHEDULES = {
    "onecycle": ["scheduler.name=onecycle"],
    "cosine_warmup_sgd": ["scheduler.name=cosine", "scheduler.warmup_epochs=0.5", "scheduler.min_lr=1e-5",
                          "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9",
                          "train.grad_clip=1.0"],
}


pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


def uninterrupted(runs, overrides, start=train):
    result = start(runs, *overrides)
    assert result.exit_code == 0, result.stderr
    return runs / result.last_line


def resumed_run(monkeypatch, runs, overrides, stops, start=train, task=Classify):
    """Train (`start`: digits with RANDOM), stopped by SIGINT at each of `stops` (from inside
    the `task` class's step), resuming each time until the run completes; at each stop, meta.json
    and metrics.jsonl end at that step."""

    def written_up_to_the_stop(folder, stop):
        meta = read_json(folder / "meta.json")
        assert meta["status"] == "interrupted" and meta["step"] == stop
        # metrics reached the disk up to the stop (logged every 3 steps), and nothing after it
        assert [r["step"] for r in metrics(folder) if r["split"] == "train"] == list(
            range(3, stop + 1, 3))
        assert max((r["step"] for r in metrics(folder)), default=0) <= stop

    return stopped_and_resumed(monkeypatch, lambda runs: start(runs, *overrides), runs, stops, task,
                               each=written_up_to_the_stop)


@pytest.mark.parametrize(
    "schedule, workers, stops",
    [
        # the first step, mid-epoch, the last step of an epoch, the first of the next, the last one
        ("onecycle", 0, [1, 9, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH]),
        ("cosine_warmup_sgd", 2, [6, STEPS_PER_EPOCH + 10]),  # streamed by DataLoader workers
    ],
)
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, schedule, workers, stops):
    placement = "stream" if workers else "device"
    overrides = [*SCHEDULES[schedule], f"data.num_workers={workers}", f"data.placement={placement}"]
    baseline = uninterrupted(tmp_path / "straight", overrides)
    folder = resumed_run(monkeypatch, tmp_path / "stopped", overrides, stops)

    assert_same_training(folder, baseline)
    # the same folder continued: one marker per resume in train.log, each recorded in meta.json
    log = (folder / "train.log").read_text()
    markers = [line for line in log.splitlines() if "===== resumed at" in line]
    assert [int(m.split(" step ")[1].split()[0]) for m in markers] == stops
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "completed"
    assert [r["step"] for r in meta["resumes"]] == stops
    assert all(r["changes"] == {} for r in meta["resumes"])
    # no step logged twice, none missing
    train_steps = [r["step"] for r in metrics(folder) if r["split"] == "train"]
    assert train_steps == list(range(3, 2 * STEPS_PER_EPOCH + 1, 3))


def test_a_segmentation_run_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    """The segment task (the same crop and flip for an image and its mask, batch norm, a
    confusion matrix in every val): stopped mid-epoch, at an epoch's end and in the next one."""
    def start(runs, *overrides):
        return kdl("train", *segment_command(tmp_path / "shapes", *overrides), "--runs-dir", runs, "--quiet")

    baseline = uninterrupted(tmp_path / "straight", [], start)
    stops = [5, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 7]
    folder = resumed_run(monkeypatch, tmp_path / "stopped", [], stops, start, Segment)
    assert_same_training(folder, baseline)
    assert [r["step"] for r in read_json(folder / "meta.json")["resumes"]] == stops


def test_resume_needs_only_the_run_folder(tmp_path, monkeypatch):
    """No config file, no runs folder option: the path of the run folder is enough."""
    signal_at(monkeypatch, [5])
    first = train(tmp_path / "runs")
    assert first.exit_code == 130
    folder = only_run(tmp_path / "runs")
    state = final_state(folder)  # everything the loop needs, by name
    # (no scheduler entry: a schedule is a pure function of the step, which "loop" holds)
    # (and, this run reading text, the digest of the vocabulary it encodes it with)
    assert state.keys() == {"format", "models", "optimizers", "scaler", "loop", "task", "window",
                            "rng", "vocabulary"}
    assert state["rng"].keys() == {"python", "numpy", "torch", "cuda"}
    assert (state["loop"]["epoch"], state["loop"]["batch"], state["loop"]["step"]) == (0, 5, 5)
    assert {"best_value", "stop_value", "bad_epochs", "epoch_sums"} <= state["loop"].keys()
    monkeypatch.chdir(tmp_path)
    result = kdl("train", "--resume", str(folder), "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.last_line == folder.name
    assert not (tmp_path / "runs" / "runs").exists() and len(list((tmp_path / "runs").iterdir())) == 1
    assert final_state(folder)["loop"]["epoch"] == 2


def test_resume_with_changes_is_refused_unless_allowed_and_recorded(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    signal_at(monkeypatch, [5])
    assert train(runs).exit_code == 130
    folder = only_run(runs)
    before = (folder / "config.yaml").read_text()

    refused = kdl("train", "--resume", folder.name, "--set", "train.epochs=3", "--runs-dir", runs)
    assert refused.exit_code == 2
    assert "train.epochs: 2 -> 3" in refused.stderr and "--allow-changes" in refused.stderr
    assert (folder / "config.yaml").read_text() == before
    assert read_json(folder / "meta.json")["status"] == "interrupted"

    allowed = kdl("train", "--resume", folder.name, "--set", "train.epochs=3", "--set",
                  "optimizer.weight_decay=0.25", "--allow-changes", "--runs-dir", runs, "--quiet")
    assert allowed.exit_code == 0, allowed.stderr
    meta = read_json(folder / "meta.json")
    assert meta["resumes"][-1]["changes"] == {"train.epochs": {"from": 2, "to": 3},
                                              "optimizer.weight_decay": {"from": 0.002, "to": 0.25}}
    # the optimizer took the new value, not the one saved with its state
    assert final_state(folder)["optimizers"]["model"]["param_groups"][0]["weight_decay"] == 0.25
    assert meta["status"] == "completed" and meta["epochs_done"] == meta["epochs"] == 3
    assert "epochs: 3" in (folder / "config.yaml").read_text()
    assert json.loads((folder / "summary.json").read_text())["epochs_done"] == 3


def test_a_signal_during_validation_stops_at_the_epoch_end(tmp_path, monkeypatch):
    """Ctrl-C while the epoch ends (validation, checkpoint) stops right there, without another
    step: the epoch-end checkpoint is the one to resume from."""
    baseline = uninterrupted(tmp_path / "straight", [])
    original, fired = Classify.eval_step, []

    def eval_step(self, batch, detailed=False):
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)
        return original(self, batch, detailed)

    monkeypatch.setattr(Classify, "eval_step", eval_step)
    result = train(tmp_path / "stopped")
    assert result.exit_code == 130, result.stderr
    folder = tmp_path / "stopped" / result.last_line
    loop = final_state(folder)["loop"]
    assert (loop["epoch"], loop["batch"], loop["step"]) == (1, 0, STEPS_PER_EPOCH)
    assert read_json(folder / "meta.json")["status"] == "interrupted"
    assert train(tmp_path / "stopped", resume=folder.name).exit_code == 0
    assert_same_training(folder, baseline)


def test_training_longer_updates_the_config_hash_and_skip_existing_matches_the_current_config(
        tmp_path):
    """A completed run trained longer has the hash of its new config (the old one kept in the
    resume record): --skip-existing with the original config no longer takes it for its own."""
    from karpathy_runner.config.loading import load_config

    def train_config(epochs: int):
        return kdl("train", CONFIGS / "digits_cnn.yaml", *sets([*RANDOM, f"train.epochs={epochs}"]),
                   "--runs-dir", tmp_path, "--quiet", "--skip-existing")

    first = train_config(1)
    folder = tmp_path / first.last_line
    original = read_json(folder / "meta.json")["config_hash"]
    longer = kdl("train", "--resume", folder.name, *sets(["train.epochs=2"]), "--allow-changes",
                 "--runs-dir", tmp_path, "--quiet")
    assert longer.exit_code == 0, longer.stderr
    meta = read_json(folder / "meta.json")
    assert meta["epochs"] == 2 and meta["resumes"][-1]["config_hash_before"] == original
    assert meta["config_hash"] == load_config(folder / "config.yaml").hash() != original
    again = train_config(1)  # the original config: a run of its own, not the changed one
    assert again.exit_code == 0 and again.last_line != folder.name
    assert read_json(tmp_path / again.last_line / "meta.json")["config_hash"] == original
    assert train_config(2).last_line == folder.name  # the changed run has the longer config
