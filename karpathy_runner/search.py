"""Adaptive search: `kdl sweep CONFIG --search tpe|random|grid --trials N --space KEY=DIST ...`.

Optuna chooses each trial's values (TPE from the results before it, at random, or the next point
of a grid) and keeps the study: its trials, their values and states, in an SQLite file in the
runs folder or in any database several machines share (`--storage`). kdl runs the trials: each
is a normal `kdl train` process and run folder, tagged with the study and its trial number, so
`kdl runs/compare/plot --sweep STUDY` read them like the points of any sweep.

A study outlives its command. Ctrl-C stops the running trials with a checkpoint; the same command
run again finds them by their tag, resumes them, and asks Optuna only for the trials still
missing. On one machine one command drives a study at a time (a lock in the runs folder); on
several machines sharing a storage, each resumes only the trials it started.

Successive halving (`--halving ETA --min-epochs R`) trains every trial R epochs, the best 1/ETA
on to R*ETA epochs, and so on up to train.epochs. A trial is paused and resumed, never trained
again: it trains with its whole config (the schedule spans train.epochs) and pauses after the
rung's epochs (`kdl train --until-epoch`), so the trial that survives ends bit for bit as the
same config trained straight through. Which trials go on is worked out from their run folders
each time, so an interrupted halving study continues where it was.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runs
from .compare import rung_of
from .errors import KdlError
from .sweep import Point, Sweep, check_point, shown, split_values, yaml_value

SEARCHES = ("tpe", "random", "grid")
SPACE_FORM = ("write --space KEY=DIST with DIST one of uniform(a,b), loguniform(a,b), int(a,b), "
              "choice(v1,v2,...), e.g. --space 'optimizer.lr=loguniform(1e-4,1e-1)'")
DIST_PATTERN = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.DOTALL)
STUDIES = ".studies"  # in the runs folder: the default storage and each study's lock


# ----------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Dimension:
    """One --space KEY=DIST: a config key and the distribution its values are drawn from."""

    key: str
    kind: str  # uniform, loguniform, int or choice
    values: tuple[Any, ...]  # (low, high), or the choices as YAML values
    text: str  # as given on the command line

    def distribution(self) -> Any:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":  # Optuna's choices are scalars; ours may be lists: their text
            return CategoricalDistribution([yaml_value(v) for v in self.values])
        if self.kind == "int":
            return IntDistribution(*self.values)
        return FloatDistribution(*self.values, log=self.kind == "loguniform")

    def value(self, sampled: Any) -> Any:
        """The config value of what Optuna sampled (a choice goes back from its text)."""
        if self.kind == "choice":
            return self.values[[yaml_value(v) for v in self.values].index(sampled)]
        return sampled

    def grid(self) -> list[Any]:
        """The values a grid search walks: the choices, or every integer of an int range."""
        if self.kind == "choice":
            return [yaml_value(v) for v in self.values]
        if self.kind == "int" and self.values[1] - self.values[0] < 10_000:
            return list(range(self.values[0], self.values[1] + 1))
        raise KdlError(f"--search grid walks listed values: --space {self.text} is continuous; "
                       "give it as choice(v1,v2,...) (or int(a,b)), or use --search tpe or random")


def parse_space(items: list[str]) -> list[Dimension]:
    """`--space KEY=DIST` items as dimensions; every mistake names the item and the fix."""
    if not items:
        raise KdlError(f"an adaptive search needs at least one --space item: {SPACE_FORM}")
    space: list[Dimension] = []
    for item in items:
        dimension = _dimension(item)
        if any(d.key == dimension.key for d in space):
            raise KdlError(f"--space {dimension.key!r} is given twice; keep one distribution per key")
        space.append(dimension)
    return space


def _dimension(item: str) -> Dimension:
    key, sep, dist = item.partition("=")
    key = key.strip()
    found = DIST_PATTERN.match(dist) if sep and key else None
    if found is None:
        raise KdlError(f"--space {item!r} is malformed: {SPACE_FORM}")
    kind, args = found.group(1), found.group(2)
    texts = [] if not args.strip() else split_values(args)
    if kind == "choice":
        if not texts or any(not t for t in texts):
            raise KdlError(f"--space {item}: choice() needs values, e.g. choice(16,32,64) or "
                           "choice([16,32],[32,64])")
        return Dimension(key, kind, tuple(_yaml(key, t, item) for t in texts), item)
    if kind not in ("uniform", "loguniform", "int"):
        raise KdlError(f"--space {item}: unknown distribution {kind!r}; {SPACE_FORM}")
    bounds = [_yaml(key, t, item) for t in texts]
    number = int if kind == "int" else (int, float)
    if len(bounds) != 2 or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds):
        what = "two integers" if kind == "int" else "two numbers"
        raise KdlError(f"--space {item}: {kind}() takes {what}, low and high, e.g. {kind}(1,8)")
    low, high = bounds
    if not low < high:
        raise KdlError(f"--space {item}: the low bound must be below the high one")
    if kind == "loguniform" and low <= 0:
        raise KdlError(f"--space {item}: loguniform's bounds must be above 0 (a log scale has no "
                       f"0 or negatives), e.g. loguniform({high / 1000:g},{high:g})")
    return Dimension(key, kind, (float(low), float(high)) if kind != "int" else (low, high), item)


def _yaml(key: str, text: str, item: str) -> Any:
    from .config import ConfigError, parse_override

    try:
        return parse_override(f"{key}={text}")[1]
    except ConfigError:
        raise KdlError(f"--space {item}: {text!r} is not a YAML value") from None


def check_space(config: Path, base: list[str], space: list[Dimension]) -> None:
    """Every bound and every choice must make a valid config, before any trial runs."""
    for dimension in space:
        for value in dimension.values:
            check_point(config, base, {dimension.key: value}, option="--space")


# ----------------------------------------------------------------------------- the study


@dataclass
class SearchSpec:
    """What a `kdl sweep --search` command asks for; the same spec is the same study."""

    config: Path
    base: list[str]  # --set items, --metric's train.best_metric included
    space: list[Dimension]
    search: str
    trials: int
    metric: str
    direction: str  # minimize or maximize
    config_hash: str  # of the config with its --set items
    name: str  # the config's name
    halving: int | None = None  # ETA
    min_epochs: int = 1
    epochs: int = 1  # train.epochs: the last rung

    def identity(self) -> dict[str, Any]:
        return {"config": self.config_hash, "space": [d.text for d in self.space],
                "search": self.search, "metric": self.metric,
                "halving": [self.halving, self.min_epochs] if self.halving else None}

    def study_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()
        return f"study-{self.name}-{digest[:8]}"

    def rungs(self) -> list[int]:
        """The epochs of each rung: R, R*ETA, R*ETA^2, ... below train.epochs, then train.epochs."""
        if not self.halving:
            return [self.epochs]
        rungs, epochs = [], self.min_epochs
        while epochs < self.epochs:
            rungs.append(epochs)
            epochs *= self.halving
        return [*rungs, self.epochs]


def metric_direction(cfg: Any) -> tuple[str, str]:
    """The metric a search optimises (train.best_metric) and Optuna's direction for it."""
    from .config import task_class

    metric = cfg.train.best_metric
    if metric is None:
        raise KdlError("this config has no train.best_metric (null), so a search has nothing to "
                       "optimise: give --metric, e.g. --metric val.loss")
    mode = cfg.train.best_mode
    if mode == "auto":
        mode = task_class(cfg.task.name).METRICS[metric.split(".", 1)[1]]
    return metric, "minimize" if mode == "min" else "maximize"


def default_storage(root: Path) -> str:
    folder = root / STUDIES
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'studies.db').resolve()}"


def open_study(spec: SearchSpec, storage: str, study_name: str, seed: int) -> Any:
    """The study `study_name` in `storage`, made if new; refused if it was made for another search.
    Its sampler is seeded with `seed` and the number of trials so far, so a command that
    continues a study does not draw the first trials' values again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                    direction=spec.direction, sampler=_sampler(spec, seed))
    except (ImportError, ValueError, optuna.exceptions.OptunaError) as exc:
        raise KdlError(f"--storage {storage}: Optuna cannot open it ({exc}). Give a database URL "
                       "such as sqlite:///studies.db or postgresql://user@host/db") from None
    made = study.user_attrs.get("kdl")
    if made is None:
        study.set_user_attr("kdl", {**spec.identity(), "config_path": str(spec.config)})
        if spec.search == "grid":  # every point queued once, in order; asked trials take them
            for values in itertools.product(*(d.grid() for d in spec.space)):
                study.enqueue_trial(dict(zip([d.key for d in spec.space], values, strict=True)))
    elif {k: made.get(k) for k in spec.identity()} != spec.identity():
        raise KdlError(
            f"study {study_name} in {storage} was made by another search (config "
            f"{made.get('config_path')}, space {' '.join(made.get('space') or [])}, search "
            f"{made.get('search')}); give another --study name, or the same options to continue it"
        )
    study.sampler = _sampler(spec, (seed * 1_000_003 + len(study.get_trials(deepcopy=False))) % 2**32)
    return study


def _sampler(spec: SearchSpec, seed: int) -> Any:
    """TPE or random; a grid's points are queued in the study (Optuna's GridSampler stops a
    study from inside `optimize`, which kdl does not use)."""
    import optuna

    if spec.search in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def study_lock(root: Path, study_name: str) -> runs.RunLock:
    """One command per study on this machine: it owns the study's unfinished trials here."""
    folder = root / STUDIES / study_name
    folder.mkdir(parents=True, exist_ok=True)
    return runs.RunLock(folder, what=f"study {study_name}").acquire()


# ----------------------------------------------------------------------------- trials


@dataclass
class TrialRun:
    """A trial of the study, and its run folder once it has one."""

    number: int
    params: dict[str, Any]  # config values by key
    run: runs.Run | None


class Search:
    """Drives a study: starts, resumes and reports trials, `jobs` at a time."""

    def __init__(self, spec: SearchSpec, study: Any, study_name: str, root: Path, jobs: int,
                 log: Callable[[str], None], fail_fast: bool = False):
        self.spec, self.study, self.study_name = spec, study, study_name
        self.root, self.jobs, self.log, self.fail_fast = root, jobs, log, fail_fast
        self.host = socket.gethostname()

    # --- trials and their runs

    def trial_runs(self) -> dict[int, runs.Run]:
        """The study's run folders here, by trial number (the newest, should there be two)."""
        found: dict[int, runs.Run] = {}
        for run in runs.iter_runs(self.root):
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

    def ask(self) -> TrialRun:
        trial = self.study.ask({d.key: d.distribution() for d in self.spec.space})
        trial.set_user_attr("host", self.host)
        return TrialRun(trial.number, {d.key: d.value(trial.params[d.key]) for d in self.spec.space},
                        None)

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

    def tell(self, number: int, run: runs.Run | None, state: str | None = None) -> None:
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
        mine = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("host") == self.host]
        queue: list[TrialRun] = []
        for frozen in mine:  # left running by a command that stopped: resume or collect them
            if not self.drawn(frozen):
                self.log(f"trial {frozen.number} was stopped while Optuna drew its values: dropped")
                self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
                continue
            trial = TrialRun(frozen.number, self.params(frozen), have.get(frozen.number))
            status = trial.run.status if trial.run else None
            if status in ("completed", "failed"):
                self.tell(trial.number, trial.run)
            elif status == "running":
                self.log(f"trial {trial.number}: its run {trial.run.id} is still running (pid "
                         f"{trial.run.meta.get('pid')}); run this command again once it ends")
            else:
                queue.append(trial)
        if queue:
            self.log(f"resuming {len(queue)} unfinished trial(s): "
                     f"{', '.join(str(t.number) for t in queue)}")

        def more() -> Point | None:
            if queue:
                return self.point(queue.pop(0), None)
            if self._size() < self.spec.trials:
                return self.point(self.ask(), None)
            return None

        return Sweep([], self.jobs, self.fail_fast, self.log, more=more, finished=self._finished,
                     total=self.spec.trials).run()

    def _size(self) -> int:
        """Trials the study has, less those dropped before Optuna drew all their values."""
        return sum(1 for t in self.study.get_trials(deepcopy=False) if self.drawn(t))

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
        from optuna.trial import TrialState

        spec = self.spec
        existing = []
        for frozen in sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number):
            if self.drawn(frozen):
                existing.append(frozen)
            else:  # stopped while Optuna drew its values: never ran
                self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
        members = [TrialRun(t.number, self.params(t), None) for t in existing[: spec.trials]]
        while len(members) < spec.trials:
            members.append(self.ask())
        rungs, code = spec.rungs(), 0
        for index, epochs in enumerate(rungs):
            self.attach(members)
            todo = [t for t in members if not self._reached(t, epochs)]
            self.log(f"rung {index + 1}/{len(rungs)}: {len(members)} trial(s) to epoch {epochs}"
                     + (f", {len(todo)} to train" if len(todo) != len(members) else ""))
            if todo:
                ran = Sweep([self.point(t, epochs) for t in todo], self.jobs, self.fail_fast,
                            self.log, total=len(todo)).run()
                if ran == 130 or (ran and self.fail_fast):
                    return ran
                code = code or ran
                self.attach(members)
            scored = [(self.rung_value(t, epochs), t) for t in members]
            for value, trial in scored:
                if value is None:
                    self.tell(trial.number, trial.run)  # failed: no value to rank it by
            ranked = sorted(((v, t) for v, t in scored if v is not None),
                            key=lambda pair: (pair[0] if spec.direction == "minimize" else -pair[0],
                                              pair[1].number))
            if index == len(rungs) - 1:
                for _, trial in ranked:
                    self.tell(trial.number, trial.run)
                break
            keep = max(1, len(ranked) // spec.halving)
            for _, trial in ranked[keep:]:
                self.tell(trial.number, trial.run, state="pruned")
            members = [t for _, t in ranked[:keep]]
            if not members:
                break
        return code

    def _reached(self, trial: TrialRun, epochs: int) -> bool:
        """Has the trial's run trained `epochs` epochs (or ended before, by early stopping)?"""
        run = trial.run
        if run is None:
            return False
        if run.status in ("completed", "failed"):
            return True
        return run.status == "paused" and int(run.meta.get("epochs_done") or 0) >= epochs

    def rung_value(self, trial: TrialRun, epochs: int) -> float | None:
        """The best value of the metric in the trial's first `epochs` epochs (from metrics.jsonl,
        so it does not change when the trial goes on); None if it failed or has none."""
        from .report import epoch_rows

        if trial.run is None or trial.run.status == "failed":
            return None
        values = [row[self.spec.metric] for row in
                  epoch_rows(runs.read_jsonl(trial.run.path / runs.METRICS))
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


def print_results(search: Search, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """The end-of-search table and the best trial, on stderr (stdout keeps the study id)."""
    import sys

    from rich.console import Console
    from rich.table import Table

    keys = [d.key for d in search.spec.space]
    table = Table(show_edge=False, header_style="bold")
    rung = search.spec.halving is not None
    for column in ["trial", *keys, "state", *(["rung"] if rung else []), "epochs",
                   search.spec.metric, "run"]:
        table.add_column(column)
    for row in rows:
        value = "-" if row["value"] is None else f"{row['value']:.4g}"
        style = "bold green" if best and row["trial"] == best["trial"] else (
            "red" if row["state"] == "fail" else None)
        table.add_row(str(row["trial"]), *(shown(row["params"].get(k, "-")) for k in keys),
                      row["state"], *([str(row.get("rung", "-"))] if rung else []),
                      str(row["epochs"]), value, row["run"] or "-", style=style)
    width = None if sys.stderr.isatty() else 200
    console = Console(stderr=True, highlight=False, width=width)
    console.print(table)
    if best is None:
        console.print("no trial completed")
        return
    values = " ".join(f"{k}={shown(v)}" for k, v in best["params"].items())
    console.print(f"best: trial {best['trial']}, {search.spec.metric} {best['value']:.4g} "
                  f"({values}), run {best['run']}")
