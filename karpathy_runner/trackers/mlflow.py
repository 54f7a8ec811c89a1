"""MLflow: one MLflow run per kdl run, through MlflowClient only; a SQLite store beside the runs
unless told otherwise."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config.training import MlflowConfig
from ..errors import KdlError
from .base import Held, Opening, param_text, scalars

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
                f"train.loggers; then continue with `{opening.resume}`"
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


TRACKER = MlflowTracker
