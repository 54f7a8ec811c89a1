"""`kdl predict`: what a run's task says of new inputs (images, texts): a classifier's classes, a
segmentation's masks (written as files), each task through its own `predict` hook.

The run is rebuilt from its config.yaml like `kdl eval` (evaluate.load_run), so new inputs go
through the run's own preparation: its data family reads them (`DataBundle.inputs`) as its
training data was read, at the run's size and in its channels, or encoded with the run's saved
vocabulary, and `prepare` normalises them as in training.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from .data import eval_batch_size
from .errors import KdlError
from .evaluate import eval_precision, load_run
from .runfolder import fsio
from .runfolder.reader import Run
from .tasks import Prediction, PredictRequest
from .updater import autocast_for


def predict_run(runs_root: Path, ref: str, given: list[str], top_k: int = 1,
                checkpoint: str = "best", device: str = "auto", out: Path | None = None,
                options: frozenset[str] = frozenset()) -> tuple[Run, list[Prediction]]:
    """The task's predictions for the inputs `given`; files they write go into `out` (None:
    predictions/<run id> in the current folder). `options`: the PREDICT_FLAGS the user set."""
    loaded = load_run(runs_root, ref, checkpoint, device)
    exp = loaded.exp
    task, inputs = exp.task, exp.data.inputs
    if not task.predicts() or inputs is None:
        raise KdlError(f"run {loaded.run.id} is a {task.name} run: `kdl predict` works with runs that "
                       "classify or segment (use `kdl sample` to draw from generative ones)")
    files = OutputFolder(Path("predictions") / loaded.run.id if out is None else out)
    request = PredictRequest(top_k=top_k, given=options, write=files.write)
    task.check_predict(request)
    items = inputs.items(given)
    task.train(False)
    autocast = autocast_for(eval_precision(exp.cfg.train.precision, exp.device), exp.device)
    size = eval_batch_size(exp.cfg.data)
    predictions = []
    for first in range(0, len(items), size):
        chunk = items[first:first + size]
        batch = exp.prepare(inputs.batch(chunk), None)
        with torch.no_grad(), autocast():
            # (an item is a text, or the path it came from)
            predictions += task.predict(batch, [str(item) for item in chunk], request)
    return loaded.run, predictions


class OutputFolder:
    """The folder a prediction's files go to, made when the first is written; a name written
    before in the same command gets -1, -2, ...; each file is written as --out files are
    (replacing only a regular file, atomically). A link or anything but a folder there is
    refused."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.names: set[str] = set()

    def write(self, name: str, data: bytes) -> Path:
        if not self.names:
            self._make()
        stem, suffix = os.path.splitext(name)
        number, unique = 0, name
        while unique in self.names:
            number += 1
            unique = f"{stem}-{number}{suffix}"
        self.names.add(unique)
        return fsio.write_output(self.folder / unique, data)

    def _make(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            mode = os.lstat(self.folder).st_mode
        except OSError as exc:
            raise KdlError(f"--out {self.folder}: cannot make the folder ({exc.strerror}); give a "
                           "folder you can write to") from None
        if not stat.S_ISDIR(mode):
            raise KdlError(f"--out {self.folder} is a symbolic link, not a folder; kdl never writes "
                           "through a link. Give a folder (kdl makes it), e.g. --out masks")
