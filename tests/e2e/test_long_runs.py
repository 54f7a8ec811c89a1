"""What a long run shows while it trains and how it ends on a budget: val within epochs
(train.eval_every_steps) that changes nothing of the training and resumes exactly, a time budget
(train.max_minutes, counted over resumes) that ends the partial epoch with its val, and
metrics.jsonl on disk at each log interval."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from kdl import CONFIGS, kdl
from stopping import (
    RANDOM,
    STEPS_PER_EPOCH,
    assert_same_tensors,
    assert_same_training,
    final_state,
    fork,
    metrics,
    only_run,
    output,
    read_json,
    sets,
    signal_at,
    train,
    train_command,
)

from karpathy_runner.loop import Trainer
from karpathy_runner.runfolder.reader import Run

pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run

EVAL = "train.eval_every_steps=5"


def done(runs, *overrides):
    result = train(runs, *overrides)
    assert result.exit_code == 0, result.stderr
    return runs / result.last_line


def test_val_within_epochs_is_recorded_and_changes_nothing_of_the_training(tmp_path):
    plain = done(tmp_path / "plain")
    evaluated = done(tmp_path / "evaluated", EVAL)
    within = [r for r in metrics(evaluated) if r.get("mid_epoch")]
    # every 5 steps but at an epoch's end (21, 42), which validates anyway
    assert [(r["step"], r["epoch"], r["split"]) for r in within] == [
        (s, 1 if s < STEPS_PER_EPOCH else 2, "val") for s in range(5, 2 * STEPS_PER_EPOCH, 5)]
    assert all({"loss", "accuracy"} <= r.keys() for r in within)
    # the same weights, optimizer state, metrics and summary as without them
    a, b = final_state(evaluated), final_state(plain)
    assert_same_tensors(a["models"], b["models"])
    assert_same_tensors(a["optimizers"], b["optimizers"])
    assert [r for r in metrics(evaluated) if not r.get("mid_epoch")] == metrics(plain)
    assert read_json(evaluated / "summary.json")["final"] == read_json(plain / "summary.json")["final"]

    # a plot of val.loss draws them against the step, the epoch ends among them
    from karpathy_runner.ui.plot import draw

    axes = draw([Run(evaluated), Run(plain)], "val.loss").axes[0]
    assert axes.get_xlabel() == "step"
    xs = [list(line.get_xdata()) for line in axes.get_lines()]
    assert xs[0] == [5, 10, 15, 20, 21, 25, 30, 35, 40, 42] and xs[1] == [21, 42]


def test_a_val_that_draws_random_numbers_changes_nothing_of_the_training(tmp_path, monkeypatch):
    """A task's evaluation may draw from torch's global generator (a family's noise, a loader's
    seed): the random states are forked around the val, so training goes on as without it."""
    from karpathy_runner.tasks.classify import Classify

    original = Classify.eval_step

    def drawing(self, batch, detailed=False):
        torch.rand(3)
        return original(self, batch, detailed)

    monkeypatch.setattr(Classify, "eval_step", drawing)
    plain = done(tmp_path / "plain")
    evaluated = done(tmp_path / "evaluated", EVAL)
    a, b = final_state(evaluated), final_state(plain)
    assert_same_tensors(a["models"], b["models"])
    assert [r for r in metrics(evaluated) if not r.get("mid_epoch")] == metrics(plain)


def test_a_run_validating_within_epochs_stopped_anywhere_resumes_exactly(tmp_path, monkeypatch):
    """Stopped at a step that validates (10), one that checkpoints (12) and one of the second
    epoch: the resumed run has every val record of the uninterrupted one, once."""
    straight = done(tmp_path / "straight", EVAL)
    stops = [10, 12, STEPS_PER_EPOCH + 4]
    signal_at(monkeypatch, stops)
    result = train(tmp_path / "stopped", EVAL)
    folder = tmp_path / "stopped" / result.last_line
    for _ in stops:
        assert result.exit_code == 130, result.stderr
        result = train(tmp_path / "stopped", resume=folder.name)
    assert result.exit_code == 0, result.stderr
    assert_same_training(folder, straight)


def test_a_run_validating_within_epochs_killed_before_its_summary_resumes_to_the_same_one(tmp_path):
    """The resume finds the last epoch done and reports its metrics from metrics.jsonl: those of
    the epoch's end, not of a val within it."""
    straight = done(tmp_path / "straight", EVAL)
    process = fork(tmp_path / "killed", *train_command(*RANDOM, EVAL),
                   kill_at=("summary.json", 1, "SIGKILL"))
    assert process.wait(timeout=240) == -signal.SIGKILL, output(process)
    folder = only_run(tmp_path / "killed")
    assert train(tmp_path / "killed", resume=folder.name).exit_code == 0
    assert_same_training(folder, straight)


def test_a_time_budget_ends_the_partial_epoch_with_its_val_and_a_checkpoint(tmp_path):
    result = train(tmp_path, "train.max_minutes=0.0001")  # 6 ms: spent by the first step
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / result.last_line
    summary = read_json(folder / "summary.json")
    assert (summary["status"], summary["stop_reason"], summary["epochs_done"]) == (
        "completed", "max_minutes", 1)
    steps = summary["steps"]
    assert 1 <= steps < STEPS_PER_EPOCH
    val = [r for r in metrics(folder) if r["split"] == "val"]
    assert [(r["step"], r["epoch"], r.get("mid_epoch")) for r in val] == [(steps, 1, None)]
    assert final_state(folder)["loop"]["step"] == steps and "val.loss" in summary["final"]


def test_the_time_budget_counts_the_time_trained_before_a_resume(tmp_path):
    """Ten minutes in all: a run that trained them before it was paused stops after the first
    step of its resume, with the val of that partial epoch."""
    # the config paused after its first epoch, as if that had taken the ten minutes
    first = kdl("train", CONFIGS / "digits_cnn.yaml", *sets([*RANDOM, "train.max_minutes=10"]),
                "--until-epoch", "1", "--runs-dir", tmp_path / "budget", "--quiet")
    assert first.exit_code == 0, first.stderr
    run = tmp_path / "budget" / first.last_line
    meta = read_json(run / "meta.json")
    (run / "meta.json").write_text(json.dumps({**meta, "duration_s": 600.0}))
    resumed = train(tmp_path / "budget", resume=run.name)
    assert resumed.exit_code == 0, resumed.stderr
    summary = read_json(run / "summary.json")
    assert (summary["stop_reason"], summary["steps"], summary["epochs_done"]) == (
        "max_minutes", STEPS_PER_EPOCH + 1, 2)
    assert [r["step"] for r in metrics(run) if r["split"] == "val"] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1]


def test_metrics_reach_the_disk_at_each_log_interval(tmp_path, monkeypatch):
    """A reader of metrics.jsonl sees each train record once its interval ends, not at the
    epoch's end."""
    seen = []
    original = Trainer._flush_window

    def flushed(self):
        original(self)
        path = self.run.folder / "metrics.jsonl"
        seen.append((self.state.step, [json.loads(line)["step"] for line in path.read_text().splitlines()]))

    monkeypatch.setattr(Trainer, "_flush_window", flushed)
    done(tmp_path)
    within = [(step, on_disk) for step, on_disk in seen if step < STEPS_PER_EPOCH]
    assert [step for step, _ in within] == [3, 6, 9, 12, 15, 18]
    assert all(on_disk and on_disk[-1] == step for step, on_disk in within)
