"""Where a run's metrics go besides metrics.jsonl: TensorBoard (tb/), MLflow, Weights & Biases.

The run writer opens the trackers that `train.loggers` names when a run starts or resumes, hands
them every metrics record, a task's images and text, and the run's end (status, config.yaml and
summary.json). TensorBoard takes each record as it comes, since a resume drops what it redoes
(purge_step). MLflow and W&B cannot take a point back, so they are `Held`: a record reaches them
only once a checkpoint covers it (a resume keeps exactly those), and after any kill and resume
their history is metrics.jsonl's, without duplicates. MLflow and W&B are optional extras, imported
only by the runs that ask for them; importing this module loads neither, nor torch (plan.py
checks `train.loggers` with it before torch loads).
"""

from __future__ import annotations

import contextlib
import html
import importlib
import io
import json
import netrc
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import MlflowConfig, WandbConfig
from .errors import KdlError

NOT_SCALARS = {"step", "epoch", "split", "time"}  # the fields of a metrics record that are no metric
OPTIONAL = {"mlflow": "mlflow", "wandb": "wandb"}  # logger -> the module it needs (and its extra)


def check_installed(loggers: list[str]) -> None:
    """Refuse, before anything is built, a tracker whose library this Python cannot import."""
    for name in loggers:
        if name not in OPTIONAL:
            continue
        try:
            importlib.import_module(OPTIONAL[name])
        except ImportError as exc:
            raise KdlError(
                f"train.loggers asks for {name}, but its library is not installed ({exc}): install "
                f"it with `pip install 'karpathy-runner[{name}]'`, or leave {name} out of train.loggers"
            ) from None


@dataclass
class Setup:
    """What the run's config says about its trackers; the engine makes it from the config."""

    loggers: list[str]
    mlflow: MlflowConfig
    wandb: WandbConfig
    name: str  # the config's name: the default MLflow experiment and W&B project
    params: dict[str, Any]  # the flat config, dotted names as --set writes them
    metric_tags: list[str]  # split/metric tags TensorBoard's HParams tab compares runs by


@dataclass
class Opening:
    """The run a tracker opens on: fresh, or resumed from a checkpoint."""

    folder: Path
    setup: Setup
    meta: dict[str, Any]  # meta.json: its "trackers" hold what each tracker kept to reopen its run
    resumed_at: int | None = None  # a resume: its checkpoint's step (None: a fresh run)
    history: list[dict[str, Any]] = field(default_factory=list)  # a resume: the records it keeps
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.folder.name

    def previous(self, name: str) -> dict[str, Any]:
        return (self.meta.get("trackers") or {}).get(name) or {}


class Tracker:
    """One destination of a run's metrics. The writer calls it on rank 0 only."""

    name = ""

    def state(self) -> dict[str, Any] | None:
        """What meta.json keeps so that a resume reopens the same tracked run."""
        return None

    def record(self, record: dict[str, Any]) -> None:
        """One metrics record, as metrics.jsonl holds it."""

    def images(self, tag: str, images: Any, step: int) -> None:
        """uint8 (B, C, H, W) images, shown as one grid."""

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def checkpointing(self) -> None:
        """A checkpoint covering everything handed over so far is being written."""

    def checkpointed(self) -> None:
        """The checkpoint last begun (`checkpointing`) is on disk."""

    def finish(self, status: str, files: list[Path]) -> None:
        """The run ended (`status` as in meta.json); `files` are its config.yaml and summary.json."""

    def close(self) -> None:
        pass


class Held(Tracker):
    """A tracker that cannot drop points: what it is handed waits for the checkpoint that covers
    it. What no checkpoint covers when the run ends (a failure, a second Ctrl-C) is never sent;
    a resume does those steps again and sends them then."""

    def __init__(self) -> None:
        self._held: list[tuple[str, tuple[Any, ...]]] = []
        self._covered: list[tuple[str, tuple[Any, ...]]] = []  # by the checkpoint being written

    def record(self, record: dict[str, Any]) -> None:
        self._held.append(("_send_records", ([record],)))

    def images(self, tag: str, images: Any, step: int) -> None:
        self._held.append(("_send_image", (tag, png_image(images), step)))

    def text(self, tag: str, text: str, step: int) -> None:
        self._held.append(("_send_text", (tag, text, step)))

    def checkpointing(self) -> None:
        self._covered += self._held
        self._held = []

    def checkpointed(self) -> None:
        covered, self._covered = self._covered, []
        for method, args in covered:
            getattr(self, method)(*args)
        if covered:
            self.flush()

    def _send_records(self, records: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _send_image(self, tag: str, image: Any, step: int) -> None:
        raise NotImplementedError

    def _send_text(self, tag: str, text: str, step: int) -> None:
        raise NotImplementedError


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's metrics under kdl's dotted names (train.loss, val.accuracy)."""
    split = record.get("split", "train")
    return {f"{split}.{key}": float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def param_text(value: Any) -> str:
    """A config value as text: strings as they are, the rest as JSON (which --set also reads)."""
    return value if isinstance(value, str) else json.dumps(value)


def png_image(images: Any) -> Any:
    """uint8 (B, C, H, W) images as one PIL image grid (the one samples/ holds)."""
    from PIL import Image

    from .writer import png_grid

    return Image.open(io.BytesIO(png_grid(images)))


def open_trackers(opening: Opening) -> list[Tracker]:
    """The trackers `train.loggers` names, each opened on this run; if one cannot open, those
    opened before it are closed."""
    from .events import EventLog

    kinds: dict[str, Any] = {"tensorboard": EventLog, "mlflow": MlflowTracker, "wandb": WandbTracker}
    opened: list[Tracker] = []
    try:
        for name in opening.setup.loggers:
            opened.append(kinds[name].open(opening))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


# ----------------------------------------------------------------------------- MLflow

MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
MLFLOW_BATCH = 1000  # metrics per log_batch call: MLflow's limit
MLFLOW_PARAMS_BATCH = 100  # params per log_batch call: MLflow's limit


def mlflow_uri(cfg: MlflowConfig, runs_root: Path) -> str:
    """train.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite store beside the runs."""
    return (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(runs_root / 'mlflow.db').resolve()}")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts beside the database (MLflow's own default is ./mlruns in
    whatever folder the command runs from); other stores choose their own."""
    database = _sqlite_path(uri)
    return None if database is None else (database.parent / "mlartifacts").resolve().as_uri()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time in a SQLite store (the runs of `kdl sweep --jobs N` share one):
    SQLite takes one writer, and two processes making a new store's tables at once fail."""
    database = _sqlite_path(uri)
    if database is None:  # a server or a database server takes concurrent clients itself
        yield
        return
    import fcntl

    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


class MlflowTracker(Held):
    """One MLflow run per kdl run: params, metrics at their steps, status, artifacts. Through
    MlflowClient only (no fluent, process-wide active run: several runs may share a process)."""

    name = "mlflow"

    def __init__(self, client: Any, run_id: str, uri: str, experiment_id: str):
        super().__init__()
        self.client, self.run_id, self.uri, self.experiment_id = client, run_id, uri, experiment_id
        self._metrics: list[Any] = []

    @classmethod
    def open(cls, opening: Opening) -> MlflowTracker:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        previous = opening.previous("mlflow")
        uri = previous.get("tracking_uri") or mlflow_uri(opening.setup.mlflow, opening.folder.parent)
        try:
            with _store_lock(uri):
                return cls._open(MlflowClient(tracking_uri=uri), uri, opening)
        except (MlflowException, OSError) as exc:
            raise KdlError(
                f"could not open this run's MLflow run at {uri} ({str(exc).strip().rstrip('.')}). "
                "Check train.mlflow.tracking_uri (or MLFLOW_TRACKING_URI), or leave mlflow out of "
                f"train.loggers; then continue with `kdl train --resume {opening.run_id}`"
            ) from None

    @classmethod
    def _open(cls, client: Any, uri: str, opening: Opening) -> MlflowTracker:
        previous = opening.previous("mlflow")
        if previous:  # a resume continues the run it started
            run = client.get_run(previous["run_id"])
            client.update_run(run.info.run_id, status="RUNNING")
            tracker = cls(client, run.info.run_id, uri, run.info.experiment_id)
        else:
            name = opening.setup.mlflow.experiment or opening.setup.name
            experiment_id = _experiment(client, name, uri)
            run = client.create_run(experiment_id, run_name=opening.run_id, tags=opening.tags)
            tracker = cls(client, run.info.run_id, uri, experiment_id)
        tracker._log_params(opening.setup.params, run.data.params)
        if opening.history:
            tracker._catch_up(opening.history)
        return tracker

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment_id": self.experiment_id}

    def _log_params(self, params: dict[str, Any], logged: dict[str, str]) -> None:
        """The flat config as params. MLflow's params cannot change: a value a resume changed
        (--allow-changes) becomes the tag kdl.changed.<key>."""
        from mlflow.entities import Param, RunTag

        values = {key: param_text(value) for key, value in params.items()}
        new = [Param(key, value) for key, value in values.items() if key not in logged]
        changed = [RunTag(f"kdl.changed.{key}", value) for key, value in values.items()
                   if key in logged and logged[key] != value]
        for start in range(0, len(new), MLFLOW_PARAMS_BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + MLFLOW_PARAMS_BATCH])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _catch_up(self, history: list[dict[str, Any]]) -> None:
        """Send the kept records MLflow lacks: a tracker added at a resume gets them all; a kill
        between a checkpoint and its hand-over left the last few out."""
        last: dict[str, int] = {}
        for record in history:
            for key in scalars(record):
                if key not in last:
                    points = self.client.get_metric_history(self.run_id, key)
                    last[key] = max((point.step for point in points), default=-1)
        self._send_records(history, after=last)
        self.flush()

    def _send_records(self, records: list[dict[str, Any]], after: dict[str, int] | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for record in records:
            step = record.get("step", 0)
            self._metrics += [Metric(key, value, now, step) for key, value in scalars(record).items()
                              if after is None or step > after.get(key, -1)]

    def _send_image(self, tag: str, image: Any, step: int) -> None:
        self.client.log_image(self.run_id, image, key=tag.replace("/", "."), step=step)

    def _send_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step{step:07d}.txt")

    def checkpointed(self) -> None:
        with _store_lock(self.uri):
            super().checkpointed()

    def flush(self) -> None:
        for start in range(0, len(self._metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=self._metrics[start:start + MLFLOW_BATCH])
        self._metrics = []

    def finish(self, status: str, files: list[Path]) -> None:
        with _store_lock(self.uri):
            for path in files:
                self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


def _experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, made if missing (by another run at the same moment too)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri))
    except MlflowException:  # made meanwhile by a parallel run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# ----------------------------------------------------------------------------- Weights & Biases

WANDB_EXIT = {"completed": 0, "interrupted": 130}  # W&B marks a run that ends non-zero failed


def wandb_mode(mode: str) -> str | None:
    """train.wandb.mode, with auto resolved: $WANDB_MODE when set (None: W&B reads it), online
    when this user is logged in, else offline (the run syncs later with `wandb sync`)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if wandb_logged_in() else "offline"


def wandb_logged_in() -> bool:
    """Whether W&B has credentials where it looks for them: WANDB_API_KEY, an identity token
    file, or the entry `wandb login` writes into ~/.netrc (or $NETRC) for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Held):
    """One W&B run per kdl run, its files under the run folder (wandb/), reopened by id on a
    resume. A W&B run's history is written in steps that only go up, so it is handed records
    that a checkpoint covers, in order, like MLflow."""

    name = "wandb"

    def __init__(self, run: Any):
        super().__init__()
        self.run = run
        self._row: dict[str, Any] = {}
        self._row_step: int | None = None

    @classmethod
    def open(cls, opening: Opening) -> WandbTracker:
        import wandb

        cfg, previous = opening.setup.wandb, opening.previous("wandb")
        try:
            run = wandb.init(
                dir=str(opening.folder), id=previous.get("id") or secrets.token_hex(4),
                resume="allow", project=cfg.project or opening.setup.name, entity=cfg.entity,
                name=opening.run_id, config=opening.setup.params, mode=wandb_mode(cfg.mode),
                tags=[f"{key}={value}" for key, value in opening.tags.items() if key != "kdl.run_id"],
                reinit="create_new", allow_val_change=True,
            )
        except (wandb.Error, OSError) as exc:
            raise KdlError(
                f"could not open this run's W&B run ({str(exc).strip().rstrip('.')}). Log in with "
                "`wandb login`, set train.wandb.mode: offline, or leave wandb out of train.loggers; "
                f"then continue with `kdl train --resume {opening.run_id}`"
            ) from None
        tracker = cls(run)
        if opening.history and not previous:  # added at a resume: the history so far
            tracker._send_records(opening.history)
            tracker.flush()
        return tracker

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project, "mode": self.run.settings.mode}

    def _send_records(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._log(record.get("step", 0), scalars(record))

    def _send_image(self, tag: str, image: Any, step: int) -> None:
        import wandb

        self._log(step, {tag: wandb.Image(image)})

    def _send_text(self, tag: str, text: str, step: int) -> None:
        import wandb

        self._log(step, {tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def _log(self, step: int, values: dict[str, Any]) -> None:
        """Values of one step join one history row; the row goes once a later step comes."""
        if self._row_step is not None and step != self._row_step:
            self.flush()
        self._row_step = step
        self._row.update(values)

    def flush(self) -> None:
        if self._row_step is not None:
            self.run.log(self._row, step=self._row_step)
        self._row, self._row_step = {}, None

    def finish(self, status: str, files: list[Path]) -> None:
        # as <kdl run id>/config.yaml: W&B's own config.yaml and summary.json sit in the same files
        for path in files:
            self.run.save(str(path), base_path=str(path.parent.parent), policy="now")
        self.run.finish(exit_code=WANDB_EXIT.get(status, 1))
