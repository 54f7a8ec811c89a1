"""What a `kdl train` command line asks for: a fresh run, a resume, or (--skip-existing) work
already done. Planning reads configs and run folders only and imports no torch, so every
config or run-reference mistake is reported in a fraction of a second."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.loading import apply_overrides, load_config, load_yaml, parse_override, parse_yaml, resolve
from .config.root import Config
from .errors import KdlError
from .runfolder import layout, sweeps
from .runfolder.locks import Lock, RunLock
from .runfolder.reader import Run, iter_runs, refuse_damaged, resolve_run
from .trackers.base import check_installed

ELSEWHERE_POLL_S = 5.0  # how often --skip-existing looks at a run another machine trains


@dataclass
class Plan:
    """What a `kdl train` command line asks for, checked before anything is built or written."""

    cfg: Config
    run: Run | None = None  # continue this run; None: start a fresh one
    changes: dict[str, Any] = field(default_factory=dict)  # --set changes to a resumed run
    done: Run | None = None  # --skip-existing found this run completed (or running elsewhere)
    sweep: dict[str, Any] | None = None  # the sweep tag of a fresh run
    lock: RunLock | None = None  # held on `run` from planning to the end of the process's work
    claim: Lock | None = None  # --skip-existing: held on the config until the process's work ends
    until_epoch: int | None = None  # --until-epoch: pause after this epoch (status paused)

    def release(self) -> None:
        """Let go of the run, then of the config: a process that waited for the claim finds
        the run free to take."""
        for held in (self.lock, self.claim):
            if held is not None:
                held.release()


def plan_train(config_path: str | None, overrides: list[str], runs_root: Path,
               resume: str | None = None, allow_changes: bool = False,
               skip_existing: bool = False, sweep: str | None = None, lock: bool = True,
               until_epoch: int | None = None, trial: dict[str, Any] | None = None,
               claim: bool = True, say: Callable[[str], None] = lambda line: None) -> Plan:
    """A fresh run, a resume, or (--skip-existing) a run of the same config to reuse. `lock`:
    hold the resumed run's lock (not in a launcher of several processes, nor in ranks but 0).
    `claim`: with --skip-existing, claim the config, and wait for another process's claim and
    for a run of the config in use (not in the processes a launcher started: it claims for
    them). `until_epoch`: pause the run after that epoch; `trial`: a search's trial tag (trial
    number, sampled point, rungs), added to the sweep tag of a fresh run; `say`: where a wait
    is said."""
    plan = _plan(config_path, overrides, runs_root, resume, allow_changes, skip_existing, sweep,
                 lock, trial, say if claim else None)
    plan.until_epoch = until_epoch
    if plan.done is None:
        try:  # a tracker that is not installed: said before torch loads, nothing written
            check_installed(plan.cfg.train.loggers)
        except KdlError:
            plan.release()
            raise
    return plan


def _plan(config_path: str | None, overrides: list[str], runs_root: Path, resume: str | None,
          allow_changes: bool, skip_existing: bool, sweep: str | None, lock: bool,
          trial: dict[str, Any] | None, wait: Callable[[str], None] | None) -> Plan:
    """`wait`: where this process's waits are said; None: it claims and waits for nothing."""
    if skip_existing and not resume:
        cfg = load_config(config_path, overrides)
        # one process at a time looks for a run of this config and trains it: another (the same
        # point of a second sweep) waits here, then finds the run made and takes it
        claim = sweeps.claim(runs_root, cfg.hash(), lambda pid: wait(
            f"another kdl process (pid {pid}) is training this config (--skip-existing): waiting "
            "for it to end, to take its run")) if wait else None
        try:
            plan = _take_existing(cfg, overrides, runs_root, sweep, lock, trial, wait)
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        plan.claim = claim
        return plan
    if resume:
        run = resolve_run(runs_root, resume)
        # before reading its state: one writer per run
        held = RunLock(run.path).acquire() if lock else None
        return _resumed(run, overrides, allow_changes, held)
    return Plan(load_config(config_path, overrides), sweep=_tag(sweep, overrides, trial))


def _take_existing(cfg: Config, overrides: list[str], runs_root: Path, sweep: str | None,
                   lock: bool, trial: dict[str, Any] | None, wait: Callable[[str], None] | None
                   ) -> Plan:
    """--skip-existing: the run of this config to reuse or resume, else a fresh one."""
    existing, held = _existing_run(runs_root, cfg, wait)
    if existing is None:
        return Plan(cfg, sweep=_tag(sweep, overrides, trial))
    reused = existing.status in ("completed", "running")
    if sweep and lock:  # the run is this sweep's point too, though another made it
        sweeps.record(runs_root, sweep, existing.id, _point(overrides), "reused" if reused else "resumed")
    if reused:
        return Plan(cfg, done=existing)
    if held is not None and not lock:  # a launcher: its rank 0 takes the run's lock
        held.release()
        held = None
    elif held is None and lock:  # (rank 0 of the processes a launcher claimed for)
        held = RunLock(existing.path).acquire()
    return _resumed(existing, [], False, held)


def _resumed(run: Run, overrides: list[str], allow_changes: bool, held: RunLock | None) -> Plan:
    """The plan to continue `run` (its lock `held`, let go if it cannot be resumed)."""
    try:
        cfg, changes = _resume_config(run, overrides, allow_changes)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return Plan(cfg, run=run, changes=changes, lock=held)


def _tag(sweep: str | None, overrides: list[str], trial: dict[str, Any] | None) -> dict[str, Any] | None:
    """The sweep tag of a fresh run: the sweep's id, its point and a search's trial."""
    return {"id": sweep, "point": _point(overrides), **(trial or {})} if sweep else None


def _point(overrides: list[str]) -> dict[str, Any]:
    """A sweep's point: what this run's --set values make of the sweep's config."""
    return {".".join(key): value for key, value in map(parse_override, overrides)}


def _existing_run(runs_root: Path, cfg: Config, wait: Callable[[str], None] | None
                  ) -> tuple[Run | None, RunLock | None]:
    """The newest run of the same experiment (config hash) that is not failed or damaged. Given
    `wait` (the process that would train it), a run still training, here or on another machine
    whose heartbeat says so, is waited for and looked at again once it ends, and the lock of a
    run to resume comes with it, held."""
    wanted = cfg.hash()
    told = False
    while True:
        run = next((run for run in sorted(iter_runs(runs_root), key=lambda r: r.id, reverse=True)
                    if run.status not in ("failed", "damaged")
                    and run.meta.get("config_hash") == wanted), None)
        if run is None or wait is None or run.status == "completed":
            return run, None
        # another machine trains it, its heartbeat says: looked at again later, its lock left
        # alone (taking it clears temp files, and where locks are not shared between machines
        # it would be granted)
        if not _beating_elsewhere(run):
            held = RunLock(run.path).acquire(lambda pid, run=run: wait(
                f"run {run.id} of this config is in use by another kdl process (pid {pid}): "
                "waiting for it to end, to take the run (--skip-existing)"))
            run = Run(run.path)  # as it ended
            if _beating_elsewhere(run):  # another machine took it meanwhile (its lock not shared)
                held.release()
            elif run.status in ("completed", "running"):  # (running: an older kdl elsewhere)
                held.release()
                return run, None
            elif run.status not in ("failed", "damaged"):
                return run, held
            else:
                held.release()  # it failed: look again
                continue
        if not told:
            wait(f"run {run.id} of this config is training ({run.process}): waiting for it to "
                 "end, or for its heartbeat to stop, to take the run (--skip-existing)")
            told = True
        time.sleep(ELSEWHERE_POLL_S)


def _beating_elsewhere(run: Run) -> bool:
    """Is `run` training on another machine, as its heartbeat says? (On this one, a `running`
    run's process is looked up by its pid.)"""
    return (run.status == "running" and bool(run.meta.get("heartbeat_s"))
            and run.meta.get("host") != layout.host_name())


def _resume_config(run: Run, overrides: list[str], allow_changes: bool
                   ) -> tuple[Config, dict[str, Any]]:
    """The config a resume continues with, and its changes; refuses what cannot be resumed."""
    refuse_damaged(run)
    if run.status == "running":
        raise KdlError(f"run {run.id} is still running ({run.process}); stop it first" + (
            f". If that machine or its job died, the run reads crashed once its heartbeat has been "
            f"silent for {round(layout.STALE_BEATS * run.meta['heartbeat_s'])} s: resume it then"
            if _beating_elsewhere(run) else ""))
    pending = run.meta.get("pending_config")
    if isinstance(pending, str):  # a change recorded, then a kill before it was applied: apply it
        raw = parse_yaml(pending, f"{run.path / layout.META} (pending_config)")
    else:  # strict: a damaged config.yaml is not the defaults
        raw = load_yaml(run.path / layout.CONFIG)
    saved = resolve(raw, str(run.path / layout.CONFIG))
    cfg = resolve(apply_overrides(raw, overrides), "--set") if overrides else saved
    changes = _diff(saved.to_dict(), cfg.to_dict())
    if changes and not allow_changes:
        shown = ", ".join(f"{k}: {v['from']!r} -> {v['to']!r}" for k, v in changes.items())
        raise KdlError(
            f"resuming {run.id} with changes ({shown}) would not continue the same experiment; "
            "add --allow-changes to resume anyway (the changes are recorded in meta.json)"
        )
    if run.status == "completed" and not changes:
        raise KdlError(
            f"run {run.id} already completed; to train longer resume with "
            "--set train.epochs=N --allow-changes"
        )
    return cfg, changes


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = {"from": a, "to": b}
    return changes
