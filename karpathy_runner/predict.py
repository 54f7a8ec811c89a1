"""`kdl predict`: a classification run's classes for new inputs (images, texts).

The run is rebuilt from its config.yaml like `kdl eval` (evaluate.load_run), so new inputs go
through the run's own preparation: its data family reads them (`DataBundle.inputs`) as its
training data was read, at the run's size and in its channels, or encoded with the run's saved
vocabulary, and `prepare` normalises them as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import eval_batch_size
from .errors import KdlError
from .evaluate import eval_precision, load_run
from .runfolder.reader import Run
from .updater import autocast_for


@dataclass
class Prediction:
    input: str  # a file path or a text
    classes: list[tuple[str, float]]  # the k likeliest classes with their probabilities


def predict_run(runs_root: Path, ref: str, given: list[str], top_k: int = 1,
                checkpoint: str = "best", device: str = "auto") -> tuple[Run, list[Prediction]]:
    loaded = load_run(runs_root, ref, checkpoint, device)
    exp = loaded.exp
    model, inputs = exp.task.classifier(), exp.data.inputs
    if model is None or inputs is None:
        raise KdlError(f"run {loaded.run.id} is a {exp.task.name} run: `kdl predict` classifies "
                       "with classification runs (use `kdl sample` to draw from generative ones)")
    items = inputs.items(given)
    names, top_k = exp.data.info.class_names, min(top_k, exp.data.info.num_classes)
    model.eval()
    autocast = autocast_for(eval_precision(exp.cfg.train.precision, exp.device), exp.device)
    size = eval_batch_size(exp.cfg.data)
    predictions = []
    for first in range(0, len(items), size):
        chunk = items[first:first + size]
        *batch, _ = exp.prepare(inputs.batch(chunk), None)
        with torch.no_grad(), autocast():
            probabilities = model(*batch).float().softmax(dim=1)  # (B, num_classes)
        values, indices = probabilities.topk(top_k, dim=1)
        for item, row, index in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            classes = [(names[i], p) for i, p in zip(index, row, strict=True)]
            predictions.append(Prediction(str(item), classes))  # a text, or the path it came from
    return loaded.run, predictions
