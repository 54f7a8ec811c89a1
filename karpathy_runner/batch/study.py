"""A search's study: what a `kdl sweep --search` command asks for (`SearchSpec`: the same spec is
the same study), its Optuna storage (an SQLite file in the runs folder, or any database several
machines share), its sampler, and its locks: one command drives it on this machine, and waits
first for the trials a killed command left running. Machines that share the study may share the
runs folder too: each locks its own folder of the study there (named by its host name or
KDL_HOST), and the command that makes a new study sets it up while the others wait."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.root import Config
from ..config.root import metric_direction as direction_of
from ..errors import KdlError, RunFailed, quoted
from ..runfolder import layout, locks
from .space import Dimension

STUDIES = ".studies"  # in the runs folder: the default storage and each study's locks
TRIALS_LOCK = "trials.lock"  # in the study's folder there: held by the trials' processes
GRID_POINT = "grid point"  # a grid trial's user attribute: its point, queued when the study was made
TRIES = 5  # to open a storage whose tables other commands are making at the same moment
CONNECT_TIMEOUT_S = 10  # for a PostgreSQL server that does not answer
RECORD_WAIT_S = 10.0  # without a new trial, for the command that made a study to record it


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
    seed: int = 0  # the config's: the sampler's seed

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


def metric_direction(cfg: Config) -> tuple[str, str]:
    """The metric a search optimises (train.best_metric) and Optuna's direction for it."""
    metric = cfg.train.best_metric
    if metric is None:
        raise KdlError("this config has no train.best_metric (null), so a search has nothing to "
                       "optimise: give --metric, e.g. --metric val.loss")
    mode = direction_of(cfg, metric, cfg.train.best_mode)
    return metric, "minimize" if mode == "min" else "maximize"


def default_storage(root: Path) -> str:
    folder = layout.made_folder(root / STUDIES, root)
    return f"sqlite:///{(folder / 'studies.db').resolve()}"


def shown_url(url: str) -> str:
    """A storage URL as kdl prints it: its password hidden."""
    return re.sub(r"(://[^:/@]*):.*@", r"\1:***@", url, count=1)


def open_study(spec: SearchSpec, storage: str, study_name: str, seed: int,
               log: Callable[[str], None] = lambda line: None) -> Any:
    """The study `study_name` in `storage`, made if new; refused if it was made for another search.
    Its sampler is seeded with `seed` and the number of trials so far, so a command that
    continues a study does not draw the first trials' values again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _storage_errors(storage):
        study, new = _made_or_loaded(spec, storage, study_name, _sampler(spec, seed))
        made = None if new else _record(study, study_name, log)
        if made is None:  # new, or made by something other than kdl
            if spec.search == "grid":  # every point queued once, in order; asked trials take them
                for values in itertools.product(*(d.grid() for d in spec.space)):
                    point = dict(zip([d.key for d in spec.space], values, strict=True))
                    study.enqueue_trial(point, user_attrs={GRID_POINT: point}, skip_if_exists=not new)
            # last: another machine's command opening the study waits for this record
            study.set_user_attr("kdl", {**spec.identity(), "config_path": str(spec.config)})
        trials = len(study.get_trials(deepcopy=False))
    if made is not None and {k: made.get(k) for k in spec.identity()} != spec.identity():
        raise KdlError(
            f"study {study_name} in {shown_url(storage)} was made by another search (config "
            f"{made.get('config_path')}, space {' '.join(made.get('space') or [])}, search "
            f"{made.get('search')}); give another --study name, or the same options to continue it"
        )
    study.sampler = _sampler(spec, (seed * 1_000_003 + trials) % 2**32)
    return study


def _storage(url: str) -> Any:
    """What Optuna opens for `url`: the URL; for a PostgreSQL server, a storage that gives up
    connecting after CONNECT_TIMEOUT_S (libpq waits as long as the system does: minutes, for a
    host that drops the packets) unless the URL sets its own connect_timeout."""
    if not url.startswith("postgresql") or "connect_timeout=" in url:
        return url
    import optuna

    timeout = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return optuna.storages.RDBStorage(url, engine_kwargs=timeout)


def _made_or_loaded(spec: SearchSpec, storage: str, study_name: str, sampler: Any) -> tuple[Any, bool]:
    """The study, and whether this command made it. Of the commands that open a new study at one
    moment (the same command started on several machines), the database lets one make it; and
    lets one make its tables in a new database, the others failing on the way: they try again."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    attempt = 0
    while True:
        try:
            opened = _storage(storage)  # (a storage makes its tables as it opens)
            try:
                return optuna.create_study(storage=opened, study_name=study_name, sampler=sampler,
                                           direction=spec.direction), True
            except optuna.exceptions.DuplicatedStudyError:
                return optuna.load_study(study_name=study_name, storage=opened, sampler=sampler), False
        except (IntegrityError, ProgrammingError):  # another command's tables, made meanwhile
            attempt += 1
            if attempt == TRIES:
                raise
            time.sleep(0.2 * attempt)


def _record(study: Any, study_name: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The kdl record of a study another command made; it writes the record once it has queued a
    grid's points, so this waits while it does (its trials still growing). None: no record comes
    (the study was made by other means, or its command was killed first)."""
    waited, trials = 0.0, -1
    while (made := study.user_attrs.get("kdl")) is None and waited < RECORD_WAIT_S:
        now = len(study.get_trials(deepcopy=False))
        if now != trials:
            if trials < 0:
                log(f"study {study_name}: waiting for the command that made it to set it up")
            waited, trials = 0.0, now
        time.sleep(0.2)
        waited += 0.2
    return made


@contextlib.contextmanager
def _storage_errors(storage: str) -> Iterator[None]:
    """Optuna's and the database's errors as one paragraph naming the storage (its password
    hidden) and the fix."""
    import optuna
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    try:
        yield
    except (ImportError, ValueError, optuna.exceptions.OptunaError, SQLAlchemyError) as exc:
        # not a URL, an unknown dialect, a file that is no database, a folder, a missing parent;
        # no driver for the database; a server that does not answer or refuses the login
        reason = quoted(str(getattr(exc, "orig", None) or exc).strip().splitlines()[0])[1:-1]
        shown = quoted(shown_url(storage))
        if isinstance(exc, ImportError):
            raise KdlError(f"study storage {shown}: its database driver is not installed ({reason}). "
                           "For postgresql:// URLs: pip install 'karpathy-runner[postgres]'") from None
        if isinstance(exc, OperationalError) and not storage.startswith("sqlite"):
            raise KdlError(f"study storage {shown}: cannot connect ({reason}). Check that the "
                           "database server runs and takes connections from this machine, and the "
                           "URL's user, password and database (createdb makes one)") from None
        raise KdlError(f"study storage {shown}: Optuna cannot open it ({reason}). Give --storage a "
                       "database URL such as sqlite:///studies.db (its folder must exist) or "
                       "postgresql://user:password@host/db") from None


@contextlib.contextmanager
def storage_lost(storage: str) -> Iterator[None]:
    """The database gone while a search runs (its server stopped, the network lost): one
    paragraph, exit 1, and the way on. The runs are files, kept; the study's record of them is
    where the database left it, and the same command, once the database answers, resumes it."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, StorageInternalError) as exc:  # (Optuna's wraps the database's)
        cause = exc.__cause__ if isinstance(exc.__cause__, SQLAlchemyError) else exc
        reason = quoted(str(getattr(cause, "orig", None) or cause).strip().splitlines()[0])[1:-1]
        raise RunFailed(f"study storage {quoted(shown_url(storage))}: the database stopped "
                        f"answering during the search ({reason}). The trials' runs are kept: once "
                        "the database answers again, run the same command: it resumes the "
                        "unfinished trials") from None


def _sampler(spec: SearchSpec, seed: int) -> Any:
    """TPE or random; a grid's points are queued in the study and its trials take them, never a
    value of the sampler's (Optuna's GridSampler stops a study from inside `optimize`, which kdl
    does not use)."""
    import optuna

    if spec.search in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def study_folder(root: Path, study_name: str, host: str) -> Path:
    """The study's folder of this machine in the runs folder, for its locks: machines that share
    a runs folder each drive the study, and lock only their own trials."""
    return layout.made_folder(root / STUDIES / study_name / host, root)


def study_lock(root: Path, study_name: str, host: str) -> locks.RunLock:
    """One command per study on this machine: it owns the study's unfinished trials here."""
    return locks.RunLock(study_folder(root, study_name, host), what=f"study {study_name} on {host}").acquire()


@contextlib.contextmanager
def trials_lock(root: Path, study_name: str, host: str, log: Callable[[str], None]) -> Iterator[int]:
    """The lock of the study's trial processes, held while any of them runs: this command takes
    it (a descriptor) and its trials inherit it, so the kernel drops it once the last of them
    ends. A command killed leaves its trials running; the next waits here for them to end before
    it reads their runs, rather than resume or start them a second time beside them."""
    import fcntl

    path = study_folder(root, study_name, host) / TRIALS_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise KdlError(f"cannot lock the trials of study {study_name} ({path}): {exc.strerror}. "
                       "Check that the folder is writable.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"study {study_name}: waiting for the trial processes an earlier command left "
                "running (it was killed, they went on) to end")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)
