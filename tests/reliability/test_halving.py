"""Successive halving interrupted at any moment: a trial killed in a rung, the sweep killed while
a trial trains, the sweep stopped before each of its decisions. Each time, the same command run
again ends with the study an uninterrupted command makes: the same rung decisions, the same best,
each trial's state and value, and each trial's run where it stopped, its records bit for bit."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest
from kdl import TINY, Result, kdl
from stopping import metrics, sets
from studies import DIGITS, hooked, study_trials, sweep_process, trial_runs

from karpathy_runner.batch.search import Search

# three trials to epoch 1, the best of them on to epoch 2: four trial processes, one at a time so
# that a seed names the same process and moment on any machine; checkpoints within the epochs
SEARCH = ["--search", "random", "--trials", "3", "--halving", "2", "--min-epochs", "1", "--jobs", "1",
          "--space", "optimizer.lr=loguniform(1e-3,3e-2)",
          *sets([*TINY, "data.batch_size=256", "model.channels=[4,8]", "train.deterministic=true",
                 "train.checkpoint_every_steps=2"])]
PROCESSES = 4
# the file replacements of a trial process before the one that commits its value at the rung
# (meta.json's epochs_done after the epoch's checkpoints): config.yaml, meta.json, last.pt x3 and
# best.pt in a first rung; metrics.jsonl, meta.json and the checkpoints in a resumed one
MOMENTS = 7
WRITES = 9  # all of them: then summary.json and the meta.json of its end (paused or completed)


def sweep(runs: Path) -> Result:
    return kdl("sweep", DIGITS, *SEARCH, "--runs-dir", runs)


def outcome(runs: Path, result: Result) -> dict[str, Any]:
    """The study a command ended with: each trial's values, state and value, its run's status,
    epochs and records (wall-clock fields aside); and the best trial the command names."""
    study = result.last_line
    runs_of = trial_runs(runs, study)
    trials = {}
    for trial in study_trials(runs, study):
        run = runs_of.get(trial.number)
        trials[trial.number] = (trial.params, trial.state.name, trial.value, *(
            (run.status, run.meta["epochs_done"], metrics(run.path)) if run else ()))
    best = [line.rsplit(", run ", 1)[0] for line in result.stderr.splitlines() if line.startswith("best:")]
    return {"trials": trials, "best": best}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Any]:
    runs = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        result = sweep(runs)
    assert result.exit_code == 0, result.stderr
    study = outcome(runs, result)
    assert sorted(state for _, state, *_ in study["trials"].values()) == ["COMPLETE", "PRUNED", "PRUNED"]
    return study


def test_a_trial_killed_at_a_random_moment_of_a_rung_is_resumed_and_the_study_ends_as_uninterrupted(
        tmp_path, monkeypatch, uninterrupted):
    """The rung waits for the killed trial's value: the command exits 1, with the trial still
    RUNNING in the study, and the same command resumes its run and decides the rung."""
    seed = random.randrange(2**32)
    draw = random.Random(seed)
    process, moment = draw.randint(1, PROCESSES), draw.randint(1, MOMENTS)
    said = f"seed {seed}: trial process {process} killed before its file replacement {moment}"
    runs = tmp_path / "runs"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with monkeypatch.context() as patch:
        for name, value in hooked(KDL_TEST_SIGNAL=f"*:{moment}:SIGKILL:self",
                                  KDL_TEST_SIGNAL_PROCESS=f"{process}:{tmp_path / 'started'}").items():
            patch.setenv(name, value)
        killed = sweep(runs)
    assert killed.exit_code == 1 and "exit -9" in killed.stderr, (said, killed.stderr)
    assert "is not decided" in killed.stderr, (said, killed.stderr)
    states = [t.state.name for t in study_trials(runs, killed.last_line)]
    assert "RUNNING" in states and set(states) <= {"RUNNING", "PRUNED"}, (said, states)

    again = sweep(runs)
    assert again.exit_code == 0, (said, again.stderr)
    assert outcome(runs, again) == uninterrupted, said


def test_a_sweep_killed_while_a_trial_trains_waits_for_it_when_run_again(tmp_path, monkeypatch,
                                                                          uninterrupted):
    """The killed sweep's trial goes on (seconds more, here) to the end of its rung; the same
    command run again waits for it, then goes on from its run as it left it."""
    seed = random.randrange(2**32)
    draw = random.Random(seed)
    process, moment = draw.randint(1, PROCESSES), draw.randint(1, WRITES)
    said = f"seed {seed}: the sweep killed by trial process {process} before its file replacement {moment}"
    runs = tmp_path / "runs"
    killed = sweep_process(runs, *SEARCH, env=hooked(
        KDL_TEST_SIGNAL=f"*:{moment}:SIGKILL:parent", KDL_TEST_SIGNAL_LINGER="3",
        KDL_TEST_SIGNAL_PROCESS=f"{process}:{tmp_path / 'started'}"))
    assert killed.returncode == -signal.SIGKILL, (said, killed.stderr)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    again = sweep(runs)
    assert again.exit_code == 0, (said, again.stderr)
    assert "waiting for the trial processes an earlier command left running" in again.stderr, (
        said, again.stderr)
    assert outcome(runs, again) == uninterrupted, said


class Stopped(BaseException):
    """The sweep's process ends here, as a kill would end it (nothing catches it)."""


def test_a_sweep_stopped_before_each_decision_is_run_again_to_the_same_decisions(
        tmp_path, monkeypatch, uninterrupted):
    """Each command stops before one decision more (a trial PRUNED or COMPLETE) than the one
    before, so a stop comes before each; the last command ends the study as uninterrupted."""
    from optuna.trial import TrialState

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    real_tell, decisions = Search.tell, {"allowed": 0, "made": 0}

    def tell(self: Search, number: int, run: Any, state: str | None = None) -> None:
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        if trial.state == TrialState.RUNNING:  # a decision, not one told again
            if decisions["allowed"] == 0:
                raise Stopped
            decisions["allowed"] -= 1
            decisions["made"] += 1
        real_tell(self, number, run, state)

    monkeypatch.setattr(Search, "tell", tell)
    runs, commands = tmp_path / "runs", 0
    while True:
        commands += 1
        try:
            result = sweep(runs)
            break
        except Stopped:
            decisions["allowed"] = 1
    assert result.exit_code == 0, result.stderr
    assert decisions["made"] == len(uninterrupted["trials"]) and commands == decisions["made"] + 1
    assert outcome(runs, result) == uninterrupted
