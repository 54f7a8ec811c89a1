"""What a `kdl train` command line asks for: a fresh run, a resume, or (--skip-existing) work
already done. Planning reads configs and run folders only and imports no torch, so every
config or run-reference mistake is reported in a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.loading import apply_overrides, load_config, load_yaml, parse_override, parse_yaml, resolve
from .config.root import Config
from .errors import KdlError
from .runfolder import layout, sweeps
from .runfolder.fsio import RunLock
from .runfolder.reader import Run, iter_runs, refuse_damaged, resolve_run
from .trackers.base import check_installed


@dataclass
class Plan:
    """What a `kdl train` command line asks for, checked before anything is built or written."""

    cfg: Config
    run: Run | None = None  # continue this run; None: start a fresh one
    changes: dict[str, Any] = field(default_factory=dict)  # --set changes to a resumed run
    done: Run | None = None  # --skip-existing found this run completed or running
    sweep: dict[str, Any] | None = None  # the sweep tag of a fresh run
    lock: RunLock | None = None  # held on `run` from planning to the end of the process's work
    until_epoch: int | None = None  # --until-epoch: pause after this epoch (status paused)


def plan_train(config_path: str | None, overrides: list[str], runs_root: Path,
               resume: str | None = None, allow_changes: bool = False,
               skip_existing: bool = False, sweep: str | None = None, lock: bool = True,
               until_epoch: int | None = None, trial: dict[str, Any] | None = None) -> Plan:
    """A fresh run, a resume, or (--skip-existing) a run of the same config to reuse. `lock`:
    hold the resumed run's lock (not in a launcher of several processes, nor in ranks but 0).
    `until_epoch`: pause the run after that epoch; `trial`: a search's trial tag (trial number,
    sampled point, rungs), added to the sweep tag of a fresh run."""
    plan = _plan(config_path, overrides, runs_root, resume, allow_changes, skip_existing, sweep,
                 lock, trial)
    plan.until_epoch = until_epoch
    if plan.done is None:
        try:  # a tracker that is not installed: said before torch loads, nothing written
            check_installed(plan.cfg.train.loggers)
        except KdlError:
            if plan.lock is not None:
                plan.lock.release()
            raise
    return plan


def _plan(config_path: str | None, overrides: list[str], runs_root: Path, resume: str | None,
          allow_changes: bool, skip_existing: bool, sweep: str | None, lock: bool,
          trial: dict[str, Any] | None) -> Plan:
    if skip_existing and not resume:
        cfg = load_config(config_path, overrides)
        existing = _existing_run(runs_root, cfg)
        if existing is not None:
            reused = existing.status in ("completed", "running")
            if sweep and lock:  # the run is this sweep's point too, though another made it
                sweeps.record(runs_root, sweep, existing.id, _point(overrides),
                              "reused" if reused else "resumed")
            if reused:
                return Plan(cfg, done=existing)
            resume, overrides = existing.id, []
    if resume:
        run = resolve_run(runs_root, resume)
        # before reading its state: one writer per run
        held = RunLock(run.path).acquire() if lock else None
        try:
            cfg, changes = _resume_config(run, overrides, allow_changes)
        except BaseException:
            if held is not None:
                held.release()
            raise
        return Plan(cfg, run=run, changes=changes, lock=held)
    tag = {"id": sweep, "point": _point(overrides), **(trial or {})} if sweep else None
    return Plan(load_config(config_path, overrides), sweep=tag)


def _point(overrides: list[str]) -> dict[str, Any]:
    """A sweep's point: what this run's --set values make of the sweep's config."""
    return {".".join(key): value for key, value in map(parse_override, overrides)}


def _existing_run(runs_root: Path, cfg: Config) -> Run | None:
    """The newest run of the same experiment (config hash) that is not failed or damaged."""
    wanted = cfg.hash()
    for run in sorted(iter_runs(runs_root), key=lambda r: r.id, reverse=True):
        if run.status not in ("failed", "damaged") and run.meta.get("config_hash") == wanted:
            return run
    return None


def _resume_config(run: Run, overrides: list[str], allow_changes: bool
                   ) -> tuple[Config, dict[str, Any]]:
    """The config a resume continues with, and its changes; refuses what cannot be resumed."""
    refuse_damaged(run)
    if run.status == "running":
        raise KdlError(f"run {run.id} is still running (pid {run.meta.get('pid')}); stop it first")
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
