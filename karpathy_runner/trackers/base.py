"""What every tracker shares: the interface the run writer calls (`Tracker`), the hold-until-
checkpointed behaviour of the trackers that cannot drop a point (`Held`), what a tracker opens
on (`Setup`, `Opening`), and opening the ones `train.loggers` names.

TensorBoard takes each record as it comes, since a resume drops what it redoes (purge_step).
MLflow and W&B cannot take a point back, so they are `Held`: a record reaches them only once a
checkpoint covers it (a resume keeps exactly those), and after any kill and resume their history
is metrics.jsonl's, without duplicates. MLflow and W&B are optional extras, imported only by the
runs that ask for them; importing this module loads neither, nor torch (plan.py checks
`train.loggers` with it before torch loads).
"""

from __future__ import annotations

import importlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.training import MlflowConfig, WandbConfig
from ..errors import KdlError
from ..ui.pictures import png_grid

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
    """What the run's config says about its trackers; the session makes it from the config."""

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
    config_text: str  # config.yaml, as the run folder holds it
    tensorboard: Path  # the folder of TensorBoard's event files (the run folder's tb/)
    resumed_at: int | None = None  # a resume: its checkpoint's step (None: a fresh run)
    history: list[dict[str, Any]] = field(default_factory=list)  # a resume: the records it keeps
    tags: dict[str, str] = field(default_factory=dict)
    resume: str = field(kw_only=True)  # the command that continues the run, as kdl prints it

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
        self._held: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        # what the checkpoint being written covers
        self._covered: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def record(self, record: dict[str, Any]) -> None:
        self._held.append((self._send_records, ([record],)))

    def images(self, tag: str, images: Any, step: int) -> None:
        self._held.append((self._send_image, (tag, png_image(images), step)))

    def text(self, tag: str, text: str, step: int) -> None:
        self._held.append((self._send_text, (tag, text, step)))

    def checkpointing(self) -> None:
        self._covered += self._held
        self._held = []

    def checkpointed(self) -> None:
        covered, self._covered = self._covered, []
        for method, args in covered:
            method(*args)
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

    return Image.open(io.BytesIO(png_grid(images)))


def open_trackers(opening: Opening) -> list[Tracker]:
    """The trackers `train.loggers` names, each opened on this run; if one cannot open, those
    opened before it are closed."""
    opened: list[Tracker] = []
    try:
        for name in opening.setup.loggers:
            module = importlib.import_module(f"{__package__}.{name}")
            opened.append(module.TRACKER.open(opening))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened
