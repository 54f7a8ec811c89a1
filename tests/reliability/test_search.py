"""Adaptive search: `kdl sweep --search/--space` through Optuna, a study stopped by Ctrl-C and
continued by the same command, successive halving on exact resume, and `kdl train --until-epoch`."""

from __future__ import annotations

import csv
import io
import json

import optuna
import pytest
from kdl import TINY, kdl
from stopping import assert_same_training, read_json, sets
from studies import DIGITS, hooked, machine_search, study_trials, sweep_process, trial_runs

from karpathy_runner.batch.study import SearchSpec
from karpathy_runner.runfolder.reader import Run, iter_runs, rung_of

pytestmark = pytest.mark.usefixtures("single_thread")  # trials are compared with a run made here


# ----------------------------------------------------------------------------- refused at once


@pytest.mark.parametrize("args, says", [
    (["--space", "optimizer.lr=loguniform(0,1)"], "loguniform's bounds must be above 0"),
    (["--space", "optimizer.lrr=uniform(0.1,0.2)"], "Did you mean 'optimizer.lr'"),
    (["--space", "model.channels=choice()"], "choice() needs values"),
    (["--space", "optimizer.lr=normal(0,1)"], "unknown distribution 'normal'"),
    (["--space", "optimizer.lr"], "--space 'optimizer.lr' is malformed"),
    (["--space", "optimizer.lr=uniform(0.2,0.1)"], "the low bound must be below the high one"),
    (["--space", "model.channels=int(1,8)"], "--space: the point model.channels=1 is not a valid"),
    (["--space", "optimizer.lr=uniform(0.1,0.2)", "--space", "optimizer.lr=uniform(0.1,0.3)"],
     "'optimizer.lr' is given twice"),
    (["--space", "optimizer.lr=uniform(0.1,0.2)", "--search", "grid"], "is continuous"),
    (["--space", "seed=int(0,3)", "--search", "grid", "--trials", "5"], "the grid has only 4 points"),
    (["--space", "seed=int(0,3)", "--search", "bayes"], "--search must be one of tpe, random, grid"),
    (["--space", "seed=int(0,3)", "--metric", "val.bogus"], "train.best_metric"),
    (["--space", "seed=int(0,3)", "--halving", "3", "--min-epochs", "15"],
     "--min-epochs 15: the first rung must train fewer epochs than train.epochs (15)"),
    (["--space", "seed=int(0,3)", "--emit"], "there is no list to print"),
    (["--space", "seed=int(0,3)", "--skip-existing"], "--skip-existing belongs to --grid sweeps"),
    (["--space", "seed=int(0,3)", "--grid", "seed=0,1"], "not both"),
    (["--grid", "seed=0,1", "--trials", "3"], "--trials belongs to a search"),
])
def test_a_bad_search_is_refused_before_any_trial_runs(tmp_path, args, says):
    trials = [] if any(a in args for a in ("--trials", "--emit", "--grid")) else ["--trials", "3"]
    result = kdl("sweep", DIGITS, *args, *trials, "--runs-dir", tmp_path)
    assert result.exit_code == 2, result.stderr
    assert says in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no run, no study, no storage file


def test_rungs_climb_by_eta_to_train_epochs():
    def rungs(min_epochs: int, eta: int, epochs: int) -> list[int]:
        return SearchSpec(DIGITS, [], [], "tpe", 9, "val.loss", "minimize", "", "x", eta,
                          min_epochs, epochs).rungs()

    assert rungs(1, 3, 9) == [1, 3, 9]
    assert rungs(2, 2, 10) == [2, 4, 8, 10]
    assert rungs(1, 3, 10) == [1, 3, 9, 10]
    assert [rung_of([1, 3, 9], e) for e in (0, 1, 2, 3, 8, 9)] == [0, 1, 1, 2, 2, 3]


# ----------------------------------------------------------------------------- pausing a run


def test_until_epoch_pauses_a_run_that_resume_takes_to_the_end(tmp_path):
    result = kdl("train", DIGITS, *sets([*TINY, "train.epochs=3"]), "--until-epoch", "1",
                 "--runs-dir", tmp_path)
    assert result.exit_code == 0, result.stderr
    run_id = result.last_line
    meta = read_json(tmp_path / run_id / "meta.json")
    assert (meta["status"], meta["epochs_done"], meta["until_epoch"]) == ("paused", 1, 1)
    assert f"paused after epoch 1/3 (step 21) at --until-epoch 1; go on with `kdl train --resume " \
           f"{run_id} --runs-dir {tmp_path}`" in result.stderr
    listed = kdl("runs", "--status", "paused", "--runs-dir", tmp_path, "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [run_id]
    result = kdl("train", "--resume", run_id, "--runs-dir", tmp_path, "--quiet")
    assert result.exit_code == 0, result.stderr
    meta = read_json(tmp_path / run_id / "meta.json")
    assert (meta["status"], meta["epochs_done"], meta["until_epoch"]) == ("completed", 3, None)


# ----------------------------------------------------------------------------- studies


def test_a_tpe_study_stopped_by_ctrl_c_is_continued_by_the_same_command(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    # three trials: the two running at the Ctrl-C are resumed, the third is started afresh
    args = ["--search", "tpe", "--trials", "3", "--jobs", "2",
            "--space", "optimizer.lr=loguniform(1e-3,1e-2)", "--space", "model.dropout=choice(0.0,0.2)",
            *sets([*TINY, "train.epochs=3"])]
    # the first trial to finish its second epoch sends the sweep's process group a SIGINT, as a
    # Ctrl-C at the terminal does: it reaches the sweep, which passes one on to each trial
    hook = hooked(KDL_TEST_SIGNAL=f"last.pt:2:SIGINT:parent-group:{tmp_path / 'signalled'}")
    first = sweep_process(runs, *args, env=hook)
    assert first.returncode == 130, first.stderr
    # one SIGINT per trial: each stops after its step with a checkpoint (two would stop it at once)
    assert "with a checkpoint" in first.stderr and "at once" not in first.stderr, first.stderr
    study = first.stdout.strip().splitlines()[-1]
    stopped = trial_runs(runs, study)
    assert stopped and all(run.status == "interrupted" for run in stopped.values())
    assert [t.state.name for t in study_trials(runs, study)] == ["RUNNING"] * len(stopped)

    # the same command again (in-process: its trials are processes all the same)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    again = kdl("sweep", DIGITS, *args, "--runs-dir", runs)
    assert again.exit_code == 0, again.stderr
    assert again.last_line == study
    assert f"resuming {len(stopped)} unfinished trial(s)" in again.stderr
    trials = study_trials(runs, study)
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(3)]
    done = trial_runs(runs, study)
    assert sorted(done) == list(range(3))  # one run per trial: none lost, none run twice
    assert all(run.status == "completed" for run in done.values())
    for number, run in stopped.items():  # the stopped trials went on in their own folders
        assert done[number].id == run.id and len(Run(run.path).meta["resumes"]) == 1
    for trial in trials:  # each trial's value is its run's best val.loss, its values its config
        meta = Run(done[trial.number].path).meta
        assert trial.value == meta["best"]["value"]
        assert meta["sweep"]["point"]["optimizer.lr"] == trial.params["optimizer.lr"]
    best = min(trials, key=lambda t: t.value)
    assert f"best: trial {best.number}, val.loss {best.value:.4g}" in again.stderr


def test_halving_keeps_the_best_1_over_eta_at_each_rung_and_the_survivor_equals_a_straight_run(
        tmp_path, monkeypatch):
    """Five trials, ETA 2, rungs of 1, 2 and 4 epochs: 5, then 2 (5 // 2: neither 5 - 5 // 2
    nor a rounded-up half), then 1 trial; the survivor paused twice and resumed twice."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trials' processes, as the run made here
    runs = tmp_path / "runs"
    result = kdl("sweep", DIGITS, "--search", "random", "--trials", "5", "--halving", "2",
                 "--min-epochs", "1", "--jobs", "2", "--space", "optimizer.lr=loguniform(1e-3,3e-2)",
                 *sets([*TINY, "train.epochs=4", "data.batch_size=256", "model.channels=[4,8]",
                        "train.deterministic=true"]), "--runs-dir", runs)
    assert result.exit_code == 0, result.stderr
    study = result.last_line
    trials = study_trials(runs, study)
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] + ["PRUNED"] * 4
    done = trial_runs(runs, study)
    epochs = {n: Run(run.path).meta["epochs_done"] for n, run in done.items()}
    assert sorted(epochs.values()) == [1] * 3 + [2] + [4]  # 5, then 2, then 1 trial

    def value_at(number: int, epoch: int) -> float:
        return min(r["loss"] for r in (json.loads(line) for line in
                                       (done[number].path / "metrics.jsonl").read_text().splitlines())
                   if r["split"] == "val" and r["epoch"] <= epoch)

    # the best 1/ETA by val.loss went on at each rung
    second = sorted(done, key=lambda n: value_at(n, 1))[:2]
    assert sorted(n for n, e in epochs.items() if e >= 2) == sorted(second)
    survivor = min(second, key=lambda n: value_at(n, 2))
    assert epochs[survivor] == 4 and Run(done[survivor].path).status == "completed"
    # the trials the halving stopped read as pruned, not as unfinished work
    assert all(Run(run.path).meta["status"] == "paused" for n, run in done.items() if n != survivor)
    assert all(Run(run.path).status == "pruned" for n, run in done.items() if n != survivor)
    listed = kdl("runs", "--status", "pruned", "--runs-dir", runs, "--json")
    assert sorted(r["id"] for r in json.loads(listed.stdout)) == sorted(
        run.id for n, run in done.items() if n != survivor)
    assert "paused" not in kdl("runs", "--runs-dir", runs).stdout

    # kdl compare --sweep shows each trial's rung and where it stopped
    shown = kdl("compare", "--sweep", study, "--runs-dir", runs).stdout
    header = next(line for line in shown.splitlines() if "trial" in line)
    assert header.replace("┃", " ").split()[:5] == ["id", "status", "trial", "rung", "epochs"]
    assert sum(" 4/4 " in line for line in shown.splitlines()) == 1
    assert sum(" 1/4 " in line for line in shown.splitlines()) == 3
    assert sum(" pruned " in line for line in shown.splitlines()) == 4
    table = kdl("compare", "--sweep", study, "--csv", "--runs-dir", runs)
    rows = {int(r["trial"]): r for r in csv.DictReader(io.StringIO(table.stdout))}
    assert {n: (int(r["rung"]), r["epochs"]) for n, r in rows.items()} == {
        n: ({1: 1, 2: 2, 4: 3}[e], f"{e}/4") for n, e in epochs.items()}

    # paused twice and resumed twice, the survivor ends bit for bit as its config trained straight
    straight = kdl("train", done[survivor].path / "config.yaml", "--runs-dir", tmp_path / "straight",
                   "--quiet")
    assert straight.exit_code == 0, straight.stderr
    assert_same_training(done[survivor].path, tmp_path / "straight" / straight.last_line)


def test_the_metric_and_its_direction_come_from_the_task():
    from karpathy_runner.batch.study import metric_direction
    from karpathy_runner.config.loading import load_config

    assert metric_direction(load_config(DIGITS, [])) == ("val.loss", "minimize")
    assert metric_direction(load_config(DIGITS, ["train.best_metric=val.accuracy"])) == (
        "val.accuracy", "maximize")
    assert metric_direction(load_config(DIGITS, ["train.best_metric=val.accuracy",
                                                 "train.best_mode=min"]))[1] == "minimize"


def test_a_study_name_made_by_another_search_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    made = optuna.create_study(storage=storage, study_name="mine")
    made.set_user_attr("kdl", {"config": "x", "space": ["seed=int(0,9)"], "search": "random",
                               "metric": "val.loss", "halving": None, "config_path": "other.yaml"})
    result = kdl("sweep", DIGITS, "--space", "optimizer.lr=uniform(0.001,0.01)", "--trials", "2",
                 "--study", "mine", "--storage", storage, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2
    assert "study mine in" in result.stderr and "was made by another search" in result.stderr
    assert "space seed=int(0,9)" in result.stderr
    assert not list(iter_runs(tmp_path / "runs"))
    assert optuna.load_study(study_name="mine", storage=storage).get_trials() == []


def test_a_grid_search_runs_each_point_once_and_a_rerun_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["sweep", DIGITS, "--search", "grid", "--space", "model.channels=choice([4,8],[8,8])",
            "--jobs", "2", *sets([*TINY, "train.epochs=1"]), "--runs-dir", tmp_path]
    result = kdl(*args)
    assert result.exit_code == 0, result.stderr
    assert "grid search, 0 of 2 trials so far" in result.stderr  # its points queued, none taken
    study = result.last_line
    done = trial_runs(tmp_path, study)
    assert sorted(run.meta["sweep"]["point"]["model.channels"] for run in done.values()) == [
        [4, 8], [8, 8]]
    assert [t.state.name for t in study_trials(tmp_path, study)] == ["COMPLETE"] * 2
    again = kdl(*args)
    assert again.exit_code == 0 and "started" not in again.stderr
    assert "grid search, 2 of 2 trials so far" in again.stderr
    assert trial_runs(tmp_path, study).keys() == done.keys()


def test_a_grid_study_asks_every_point_once_in_order(tmp_path):
    from karpathy_runner.batch.search import Search
    from karpathy_runner.batch.space import parse_space
    from karpathy_runner.batch.study import open_study

    space = parse_space(["seed=int(0,1)", "model.channels=choice([4,8],[8,8])"])
    spec = SearchSpec(DIGITS, [], space, "grid", 4, "val.loss", "minimize", "hash", "digits", None)
    study = open_study(spec, f"sqlite:///{tmp_path / 'studies.db'}", "grid", seed=0)
    search = Search(spec, study, "grid", tmp_path, 1, lambda line: None)
    asked = [search.ask().params for _ in range(4)]
    assert asked == [{"seed": s, "model.channels": c} for s in (0, 1) for c in ([4, 8], [8, 8])]


def test_a_grid_search_with_halving_asks_each_point_once(tmp_path):
    """The grid's points wait in the study (WAITING) until a trial asks for one: halving's first
    rung leaves them there and asks each in turn (telling a WAITING trial anything is an error)."""
    from optuna.trial import TrialState

    from karpathy_runner.batch.search import Search
    from karpathy_runner.batch.space import parse_space
    from karpathy_runner.batch.study import open_study

    spec = SearchSpec(DIGITS, [], parse_space(["seed=int(0,2)"]), "grid", 3, "val.loss", "minimize",
                      "hash", "digits", halving=2, min_epochs=1, epochs=2)
    study = open_study(spec, f"sqlite:///{tmp_path / 'studies.db'}", "grid", seed=0)
    first_rung = Search(spec, study, "grid", tmp_path, 1, lambda line: None)._members()
    assert [trial.params for trial in first_rung] == [{"seed": s} for s in (0, 1, 2)]
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 3


def test_a_grid_point_whose_trial_was_stopped_while_drawn_is_queued_again(tmp_path):
    """A command killed while Optuna drew a trial's values took the point from the queue: the
    trial is dropped (FAIL, never run) and its point queued again, so the grid keeps it."""
    from karpathy_runner.batch.search import Search
    from karpathy_runner.batch.space import parse_space
    from karpathy_runner.batch.study import open_study

    spec = SearchSpec(DIGITS, [], parse_space(["seed=int(0,2)"]), "grid", 3, "val.loss", "minimize",
                      "hash", "digits", halving=2, min_epochs=1, epochs=2)
    study = open_study(spec, f"sqlite:///{tmp_path / 'studies.db'}", "grid", seed=0)
    search = Search(spec, study, "grid", tmp_path, 1, lambda line: None)
    study.ask().set_user_attr("host", search.host)  # point 0 taken, then the kill: no values
    assert sorted(trial.params["seed"] for trial in search._members()) == [0, 1, 2]
    assert [t.state.name for t in study.get_trials()] == ["FAIL"] + ["RUNNING"] * 3


@pytest.mark.parametrize("other", ["drawn", "being drawn"])
def test_the_last_trial_of_a_shared_study_goes_to_one_machine(tmp_path, monkeypatch, other):
    """Machines a and b both see one of `--trials` left, and a asks first: b's trial gets no
    values and runs nothing, so the study keeps `--trials` trials, whether a's are drawn yet or
    not, and b asks for none after."""
    from karpathy_runner.batch.space import parse_space

    spec = SearchSpec(DIGITS, [], parse_space(["seed=int(0,99)"]), "random", 2, "val.loss",
                      "minimize", "hash", "digits", None)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    a, b = (machine_search(monkeypatch, host, spec, storage, "shared", tmp_path) for host in "ab")
    a.ask()
    real_ask = b.study.ask

    def ask_after_a() -> optuna.trial.Trial:
        if other == "drawn":
            a.ask()
        else:  # a's trial asked, its values not drawn yet
            a.study.ask().set_user_attr("host", "a")
        return real_ask()

    monkeypatch.setattr(b.study, "ask", ask_after_a)
    assert b.ask() is None
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert [t.user_attrs["host"] for t in trials] == ["a", "a", "b"]
    assert [t.state.name for t in trials] == ["RUNNING", "RUNNING", "FAIL"]
    assert not trials[2].params
    assert b.size() == spec.trials  # b's command asks for no more
