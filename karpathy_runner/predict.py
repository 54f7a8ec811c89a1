"""`kdl predict`: a classification run's classes for new images or texts.

The run is rebuilt from its config.yaml like `kdl eval` (engine.load_run), so new inputs go
through the run's own preparation: images are read at the run's size (a pretrained model's
resize and centre crop for image folders), in its channels, normalised as in training; texts
are split into words and encoded with the run's saved vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import runs
from .data import eval_batch_size
from .engine import Loaded, eval_precision, load_run
from .errors import KdlError
from .trainer import autocast_for


@dataclass
class Prediction:
    input: str  # a file path or a text
    classes: list[tuple[str, float]]  # the k likeliest classes with their probabilities


def predict_run(runs_root: Path, ref: str, inputs: list[str], top_k: int = 1,
                checkpoint: str = "best", device: str = "auto") -> tuple[runs.Run, list[Prediction]]:
    loaded = load_run(runs_root, ref, checkpoint, device)
    exp = loaded.exp
    if exp.task.name != "classify":
        raise KdlError(f"run {loaded.run.id} is a {exp.task.name} run: `kdl predict` classifies "
                       "with classification runs (use `kdl sample` to draw from generative ones)")
    if exp.data.info.kind in ("image", "image_rows"):
        items, fetch = _image_inputs(inputs, loaded)
    else:
        items, fetch = _text_inputs(inputs, loaded)
    return loaded.run, _predict(loaded, items, fetch, min(top_k, exp.data.info.num_classes))


def _predict(loaded: Loaded, items: list[str], fetch: Callable[[list[str]], tuple[torch.Tensor, ...]],
             top_k: int) -> list[Prediction]:
    exp = loaded.exp
    model, names = exp.task.models["model"], exp.data.info.class_names
    model.eval()
    autocast = autocast_for(eval_precision(exp.cfg.train.precision, exp.device), exp.device)
    size = eval_batch_size(exp.cfg.data)
    predictions = []
    for first in range(0, len(items), size):
        chunk = items[first:first + size]
        *batch, _ = exp.prepare(fetch(chunk), None)
        with torch.no_grad(), autocast():
            probabilities = model(*batch).float().softmax(dim=1)  # (B, num_classes)
        values, indices = probabilities.topk(top_k, dim=1)
        for item, row, index in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            predictions.append(Prediction(item, [(names[i], p) for i, p in zip(index, row, strict=True)]))
    return predictions


def _image_inputs(inputs: list[str], loaded: Loaded) -> tuple[list[str], Callable[..., Any]]:
    """Image files, and the images inside folders (recursively, sorted)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from .data.images import read_images

    paths: list[str] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise KdlError(f"{given}: the folder holds no images ({', '.join(IMG_EXTENSIONS)})")
            paths += found
        elif path.is_file():
            paths.append(str(path))
        else:
            raise KdlError(f"{given}: no such image file or folder; run {loaded.run.id} classifies "
                           "images: give image files or folders of them")
    info, train = loaded.exp.data.info, loaded.exp.data.train
    # the size the run's images had: an image folder's own (and crop), else the dataset's
    size, crop = getattr(train, "image_size", info.image_size[0]), getattr(train, "crop", None)

    def fetch(chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            images = read_images(chunk, info.in_channels, size, crop)
        except OSError as exc:  # PIL: not an image, or a damaged one
            raise KdlError(f"cannot read an image among {', '.join(chunk)}: {exc}") from None
        return images, torch.zeros(len(chunk), dtype=torch.int64)

    return paths, fetch


def _text_inputs(inputs: list[str], loaded: Loaded) -> tuple[list[str], Callable[..., Any]]:
    """Texts: each argument, or for an argument naming a file, each non-empty line of it."""
    from .data.text import encode_texts

    texts: list[str] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_file():
            try:
                texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                          if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise KdlError(f"{given}: cannot read it as UTF-8 text, one text per line ({exc})") from None
        else:
            texts.append(given)
    if not texts:
        raise KdlError("no text to classify: the files given are empty")
    cfg, vocabulary = loaded.exp.cfg.data, loaded.exp.data.info.vocabulary

    def fetch(chunk: list[str]) -> tuple[torch.Tensor, ...]:
        dataset = encode_texts(chunk, cfg, vocabulary)
        return dataset.get_batch(torch.arange(len(chunk)))

    return texts, fetch
