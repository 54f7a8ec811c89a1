"""Adaptive search: `kdl sweep CONFIG --search tpe|random|grid --trials N --space KEY=DIST ...`.

Optuna chooses each trial's values (TPE from the results before it, at random, or the next point
of a grid) and keeps the study: its trials, their values and states, in an SQLite file in the
runs folder or in any database several machines share (`--storage`). kdl runs the trials: each
is a normal `kdl train` process and run folder, tagged with the study and its trial number, so
`kdl runs/compare/plot --sweep STUDY` read them like the points of any sweep.

A study outlives its command. Ctrl-C stops the running trials with a checkpoint; the same command
run again finds them by their tag, resumes them, and asks Optuna only for the trials still
missing. On one machine one command drives a study at a time (a lock in the runs folder); on
several machines sharing a storage, each records itself on the trials it asks for (its host name
or KDL_HOST) and resumes only those: another machine's unfinished trial may be training there.
A grid's points wait in the study until a trial takes one, so none runs twice.

Successive halving (`--halving ETA --min-epochs R`) trains every trial R epochs, the best 1/ETA
on to R*ETA epochs, and so on up to train.epochs. A trial is paused and resumed, never trained
again: it trains with its whole config (the schedule spans train.epochs) and pauses after the
rung's epochs (`kdl train --until-epoch`), so the trial that survives ends bit for bit as the
same config trained straight through. Which trials go on is worked out from their run folders
each time, and a rung is decided only once every trial has its value at it (a trial killed on the
way stays RUNNING; the command exits 1, and run again resumes it), so an interrupted halving study
ends as an uninterrupted one. The trials' processes hold the study's trials lock: the command run
again after one was killed waits for the trials it left running. One machine drives a halving
study, as its rungs are decided from every trial's value.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KdlError
from ..runfolder import fsio, layout, sweeps
from ..runfolder.reader import Run, iter_runs, rung_of
from ..ui.tables import epoch_rows
from .jobs import JobPool
from .launch import Launcher
from .space import check_space, parse_space
from .study import (
    GRID_POINT,
    SearchSpec,
    default_storage,
    metric_direction,
    open_study,
    shown_url,
    storage_lost,
    study_lock,
    trials_lock,
)
from .sweep import Point, Processes, Sweep, yaml_value

SEARCHES = ("tpe", "random", "grid")


def plan_search(config: Path, base: list[str], search: str, space_items: list[str],
                trials: int | None, metric: str | None, halving: int | None,
                min_epochs: int) -> SearchSpec:
    """What `kdl sweep --search` asks for, everything checked before Optuna loads or any trial
    runs."""
    from ..config.loading import load_config

    if search not in SEARCHES:
        raise KdlError(f"--search must be one of {', '.join(SEARCHES)}; got {search!r}")
    space = parse_space(space_items)
    if metric is not None:
        base = [*base, f"train.best_metric={metric}"]
    cfg = load_config(config, base)
    check_space(config, base, space)
    metric_name, direction = metric_direction(cfg)
    if search == "grid":
        size = math.prod(len(dimension.grid()) for dimension in space)
        if trials is not None and trials > size:
            raise KdlError(f"--trials {trials}: the grid has only {size} points")
        trials = trials or size
    if trials is None:
        raise KdlError(f"--search {search} needs --trials N: how many trials the study runs")
    if halving is not None and min_epochs >= cfg.train.epochs:
        raise KdlError(f"--min-epochs {min_epochs}: the first rung must train fewer epochs than "
                       f"train.epochs ({cfg.train.epochs}), or there is nothing to halve")
    return SearchSpec(config, base, space, search, trials, metric_name, direction, cfg.hash(),
                      cfg.name, halving, min_epochs, cfg.train.epochs, cfg.seed)


@dataclass
class Outcome:
    """A search command's end: the study, its trials as rows, the best, the exit code."""

    search: Search
    storage: str  # its password hidden
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    code: int


def run_search(spec: SearchSpec, root: Path, storage: str | None, study_name: str | None,
               jobs: int, fail_fast: bool, log: Callable[[str], None],
               launcher: Launcher | None = None) -> Outcome:
    """Open (or continue) the study and run its trials until it has `spec.trials`, `jobs` at a
    time, each a process here or a job of `launcher`; one command per study on this machine."""
    name = study_name or spec.study_name()
    url = storage or default_storage(root)
    host = layout.host_name()
    with study_lock(root, name, host), trials_lock(root, name, host, log) as trials, storage_lost(url):
        study = open_study(spec, url, name, spec.seed, log)
        pool = (JobPool(launcher, root, name) if launcher and launcher.jobs
                else Processes(jobs, inherited=(trials,)))  # a trial's process holds the lock
        runner = Search(spec, study, name, root, jobs, log, fail_fast, pool)
        rungs = f", halving by {spec.halving} over epochs {spec.rungs()}" if spec.halving else ""
        log(f"study {name}: {spec.search} search, {runner.size()} of {spec.trials} trials so far, "
            f"{jobs} at a time{rungs}; {spec.direction} {spec.metric}; storage {shown_url(url)}")
        with contextlib.closing(pool):  # one pool for every rung
            code = runner.halve() if spec.halving else runner.run()
        rows = runner.results()
        best = runner.best(rows)
    return Outcome(runner, shown_url(url), rows, best, 1 if code == 0 and best is None else code)


# ----------------------------------------------------------------------------- trials


@dataclass
class TrialRun:
    """A trial of the study, and its run folder once it has one."""

    number: int
    params: dict[str, Any]  # config values by key
    run: Run | None


class Search:
    """Drives a study: starts, resumes and reports trials, `jobs` at a time."""

    def __init__(self, spec: SearchSpec, study: Any, study_name: str, root: Path, jobs: int,
                 log: Callable[[str], None], fail_fast: bool = False, launcher: Any = None):
        self.spec, self.study, self.study_name = spec, study, study_name
        self.root, self.jobs, self.log, self.fail_fast = root, jobs, log, fail_fast
        self.launcher = launcher or Processes(jobs)  # where trials run: processes or jobs
        self.host = layout.host_name()

    # --- trials and their runs

    def trial_runs(self) -> dict[int, Run]:
        """The study's run folders here, by trial number (the newest, should there be two)."""
        found: dict[int, Run] = {}
        for run in iter_runs(self.root):
            tag = run.meta.get("sweep")
            if isinstance(tag, dict) and tag.get("id") == self.study_name and "trial" in tag:
                found[int(tag["trial"])] = run
        return found

    def params(self, frozen: Any) -> dict[str, Any]:
        return {d.key: d.value(frozen.params[d.key]) for d in self.spec.space}

    def drawn(self, frozen: Any) -> bool:
        """Has Optuna drawn all of the trial's values (not stopped in the middle of it)?"""
        return set(frozen.params) == {d.key for d in self.spec.space}

    def attach(self, trials: list[TrialRun]) -> None:
        """Each trial's run folder as it is now (a Run reads its meta.json once)."""
        have = self.trial_runs()
        for trial in trials:
            trial.run = have.get(trial.number)

    def ask(self) -> TrialRun | None:
        """A new trial of this machine, its values drawn (a grid's: the next point queued in the
        study); None once a grid's points are all taken, or once another machine took the last of
        `--trials` (both saw one left)."""
        from optuna.trial import TrialState

        grid = self.spec.search == "grid"
        if grid and not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        trial = self.study.ask()
        trial.set_user_attr("host", self.host)  # first: a kill while it draws leaves a trial of ours
        if (GRID_POINT not in trial.user_attrs if grid  # another machine took the last point
                else self.size(before=trial.number) >= self.spec.trials):  # or took the last trial
            self.study.tell(trial.number, state=TrialState.FAIL)  # since the line above: no values
            return None
        return TrialRun(trial.number, {d.key: d.value(d.suggest(trial)) for d in self.spec.space}, None)

    def size(self, before: float = math.inf) -> int:
        """Trials of the study (those numbered below `before`) that count: drawn, or being drawn
        on another machine. One dropped before Optuna drew all its values does not count."""
        from optuna.trial import TrialState

        return sum(1 for t in self.study.get_trials(deepcopy=False) if t.number < before
                   and (self.drawn(t) or t.state == TrialState.RUNNING))

    def drop(self, frozen: Any) -> None:
        """A trial stopped while Optuna drew its values never ran: FAIL, its grid point queued
        again for the next trial."""
        from optuna.trial import TrialState

        self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
        if GRID_POINT in frozen.user_attrs:
            point = frozen.user_attrs[GRID_POINT]
            self.study.enqueue_trial(point, user_attrs={GRID_POINT: point})

    def point(self, trial: TrialRun, until: int | None) -> Point:
        """The `kdl train` command of a trial: started with its values, or its run resumed."""
        argv = ["train"]
        if trial.run is None:
            sets = [*self.spec.base, *(f"{k}={yaml_value(v)}" for k, v in trial.params.items())]
            tag = {"trial": trial.number, "point": trial.params, "search": self.spec.search,
                   **({"rungs": self.spec.rungs()} if self.spec.halving else {})}
            argv += [str(self.spec.config), *(x for s in sets for x in ("--set", s)),
                     "--sweep", self.study_name, "--trial", json.dumps(tag)]
        else:
            argv += ["--resume", trial.run.id]
        argv += ["--runs-dir", str(self.root), "--quiet"]
        if until is not None and until < self.spec.epochs:
            argv += ["--until-epoch", str(until)]
        return Point(trial.number, trial.params, argv, name=f"trial {trial.number}")

    def tell(self, number: int, run: Run | None, state: str | None = None) -> None:
        """The trial's end: PRUNED if `state` says so, else COMPLETE with its run's best value
        of the metric, or FAIL (no completed run, or no finite value)."""
        from optuna.trial import TrialState

        if state == "pruned":
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            return
        value = (run.meta.get("best") or {}).get("value") if run is not None else None
        if run is not None and run.status == "completed" and _finite(value):
            self.study.tell(number, float(value), skip_if_finished=True)
        else:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    # --- plain search: trials as they come

    def run(self) -> int:
        from optuna.trial import TrialState

        have = self.trial_runs()
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        mine = [t for t in running if t.user_attrs.get("host") == self.host]
        theirs = [t for t in running if t.user_attrs.get("host") not in (self.host, None)]
        if theirs:
            hosts = sorted({str(t.user_attrs["host"]) for t in theirs})
            self.log(f"{len(theirs)} unfinished trial(s) of another machine ({', '.join(hosts)}; this is "
                     f"{self.host}) left to it: its command resumes them. If that machine is gone and "
                     f"its trials' runs are in this runs folder, run this command with KDL_HOST={hosts[0]}")
        queue: list[TrialRun] = []
        for frozen in mine:  # left running by a command that stopped: resume or collect them
            if not self.drawn(frozen):
                self.log(f"trial {frozen.number} was stopped while Optuna drew its values: dropped")
                self.drop(frozen)
                continue
            trial = TrialRun(frozen.number, self.params(frozen), have.get(frozen.number))
            status = trial.run.status if trial.run else None
            if status in ("completed", "failed"):
                self.tell(trial.number, trial.run)
            elif status == "running" and not self.launcher.active(trial.number):
                self.log(f"trial {trial.number}: its run {trial.run.id} runs ({trial.run.process}); "
                         "run this command again once it ends, or reads crashed (its machine died)")
            else:
                queue.append(trial)
        if queue:
            self.log(f"resuming {len(queue)} unfinished trial(s): "
                     f"{', '.join(str(t.number) for t in queue)}")

        def more() -> Point | None:
            if queue:
                return self.point(queue.pop(0), None)
            asked = self.ask() if self.size() < self.spec.trials else None
            return None if asked is None else self.point(asked, None)

        return Sweep([], self.jobs, self.fail_fast, self.log, more=more, finished=self._finished,
                     total=self.spec.trials, launcher=self.launcher).run()

    def _finished(self, point: Point) -> None:
        """Tell the study a trial's end, as its run folder has it; a trial stopped on the way
        stays RUNNING in the study, for the next command to resume (or start, if it made no
        run folder)."""
        run = self.trial_runs().get(point.index)
        status = run.status if run else None
        if status in ("completed", "failed") or (run is None and point.status == "bad config"):
            self.tell(point.index, run)

    # --- successive halving: rungs of trials

    def halve(self) -> int:
        """Train the trials rung by rung, deciding each rung from every trial's value at it."""
        rungs, code = self.spec.rungs(), 0
        self._alone()
        members = self._members()
        for index, epochs in enumerate(rungs):
            self.attach(members)
            todo = [t for t in members if not self._reached(t, epochs)]
            self.log(f"rung {index + 1}/{len(rungs)}: {len(members)} trial(s) to epoch {epochs}"
                     + (f", {len(todo)} to train" if len(todo) != len(members) else ""))
            if todo:
                ran = Sweep([self.point(t, epochs) for t in todo], self.jobs, self.fail_fast,
                            self.log, total=len(todo), launcher=self.launcher).run()
                if ran == 130 or (ran and self.fail_fast):
                    return ran
                code = code or ran
                self.attach(members)
            missing = [t for t in members if not self._reached(t, epochs)]
            if missing:  # (a process killed, a run someone else trains): decided on the next command
                self.log(f"rung {index + 1}/{len(rungs)} is not decided: no value at epoch {epochs} "
                         f"yet from {', '.join(self._where(t) for t in missing)}, and a rung is "
                         "decided from every trial's value. Run this command again: it resumes "
                         "them and decides the rung.")
                return 1
            members = self._decide(members, epochs, last=index == len(rungs) - 1)
            if not members:
                break
        return code

    def _decide(self, members: list[TrialRun], epochs: int, last: bool) -> list[TrialRun]:
        """Rank the trials of a rung by their value at its epochs: the best 1/ETA go on (the
        rest are PRUNED), or, at the last rung, each is COMPLETE; a trial without a value FAILs."""
        scored = [(self.rung_value(t, epochs), t) for t in members]
        for value, trial in scored:
            if value is None:
                self.tell(trial.number, trial.run)  # failed: no value to rank it by
        ranked = [t for _, t in sorted(
            ((v, t) for v, t in scored if v is not None),
            key=lambda pair: (pair[0] if self.spec.direction == "minimize" else -pair[0],
                              pair[1].number))]
        if last:
            for trial in ranked:
                self.tell(trial.number, trial.run)
            return []
        keep = max(1, len(ranked) // self.spec.halving)
        for trial in ranked[keep:]:
            self.tell(trial.number, trial.run, state="pruned")
            if trial.run.meta.get("status") == "paused":
                sweeps.record_pruned(self.root, self.study_name, trial.run.id,
                                     int(trial.run.meta.get("epochs_done") or 0))
        return ranked[:keep]

    @staticmethod
    def _where(trial: TrialRun) -> str:
        if trial.run is None:
            return f"trial {trial.number} (no run)"
        return (f"trial {trial.number} (run {trial.run.id}, {trial.run.status} after epoch "
                f"{int(trial.run.meta.get('epochs_done') or 0)})")

    def _members(self) -> list[TrialRun]:
        """The trials of the first rung: those a command before drew, then new ones up to
        `--trials`. A grid's points wait in the study (WAITING) until a trial is asked."""
        from optuna.trial import TrialState

        existing = []
        for frozen in sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number):
            if frozen.state == TrialState.WAITING:
                continue
            if self.drawn(frozen):
                existing.append(frozen)
            elif frozen.state == TrialState.RUNNING:  # stopped while Optuna drew its values
                self.drop(frozen)
        members = [TrialRun(t.number, self.params(t), None) for t in existing[: self.spec.trials]]
        while len(members) < self.spec.trials and (trial := self.ask()) is not None:
            members.append(trial)
        self._alone()  # again: a machine that started at the same moment has asked too
        return members

    def _alone(self) -> None:
        """A rung is decided from every trial's value, so one machine drives a halving study
        (its trials' hosts say which); another's command is refused."""
        hosts = {t.user_attrs.get("host") for t in self.study.get_trials(deepcopy=False)}
        others = sorted(str(h) for h in hosts - {self.host, None})
        if others:
            raise KdlError(
                f"study {self.study_name} has trials of another machine ({', '.join(others)}; this "
                f"is {self.host}): successive halving decides each rung from every trial's value, so "
                f"one machine drives a halving study. Run this command on {others[0]} (or with "
                f"KDL_HOST={others[0]}, if its trials' runs are here), or give --study a new name")

    def _reached(self, trial: TrialRun, epochs: int) -> bool:
        """Has the trial's run trained `epochs` epochs and paused (or ended: completed, early
        stopping included, or failed)? A run stopped on the way (killed, interrupted) has not,
        even past `epochs`: it is resumed, and pauses at once, so a pruned trial's run reads so."""
        run = trial.run
        if run is None:
            return False
        if run.status in ("completed", "failed"):
            return True
        return run.status in ("paused", "pruned") and int(run.meta.get("epochs_done") or 0) >= epochs

    def rung_value(self, trial: TrialRun, epochs: int) -> float | None:
        """The best value of the metric in the trial's first `epochs` epochs (from metrics.jsonl,
        so it does not change when the trial goes on); None if it failed or has none."""
        if trial.run is None or trial.run.status == "failed":
            return None
        values = [row[self.spec.metric] for row in
                  epoch_rows(fsio.read_jsonl(trial.run.path / layout.METRICS))
                  if row["epoch"] <= epochs and _finite(row.get(self.spec.metric))]
        if not values:
            return None
        return min(values) if self.spec.direction == "minimize" else max(values)

    # --- the end

    def results(self) -> list[dict[str, Any]]:
        have = self.trial_runs()
        rungs = self.spec.rungs() if self.spec.halving else None
        rows = []
        for frozen in sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number):
            run = have.get(frozen.number)
            epochs = int(run.meta.get("epochs_done") or 0) if run else 0
            value = frozen.value
            rung = rung_of(rungs, epochs) if rungs else None
            if value is None and rung:  # a pruned trial: its value where it stopped
                value = self.rung_value(TrialRun(frozen.number, {}, run), rungs[rung - 1])
            rows.append({
                "trial": frozen.number, "state": frozen.state.name.lower(),
                "params": self.params(frozen) if frozen.params else {},
                "value": value, "run": run.id if run else None,
                "status": run.status if run else None, "epochs": epochs,
                **({"rung": rung} if rungs else {}),
            })
        return rows

    def best(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The completed trial with the best value, of the rows `results` made."""
        done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
        if not done:
            return None
        pick = min if self.spec.direction == "minimize" else max
        return pick(done, key=lambda r: r["value"])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
