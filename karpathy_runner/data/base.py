"""What every data family gives: datasets that fetch whole batches by index, what the model and
the task learn about the data (`DataInfo`), the preparation of a batch on the device (`Prepare`),
and how new inputs are read for `kdl predict` (`Inputs`), bundled as a `DataBundle`.

A data family's config class (config/data.py) names its `build(cfg, seed, vocabulary,
preprocessing) -> DataBundle`: `seed` is the run's, `vocabulary` a run's saved one (text and
character data use it instead of building their own), `preprocessing` a pretrained model's
(image data uses it instead of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config.families import DataConfig, builder
from ..errors import KdlError


class BatchDataset:
    """A split: `len` items, fetched a whole batch at a time by index. A split held in memory
    says how many bytes (`nbytes`), and can then live on the training device (`to`, `device`),
    where its batches are cut."""

    nbytes: int | None = None  # None: read from disk batch by batch, never held whole
    device: torch.device | None = None  # where its tensors are (None: on the host)

    def __len__(self) -> int:
        raise NotImplementedError

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def to(self, device: torch.device) -> BatchDataset:
        """The split on `device` (data.placement: device)."""
        return self

@dataclass
class DataInfo:
    """What the model and the task learn from the data (never written back into the config)."""

    kind: str  # the data kind: "image", "image_rows", "text", "chars"
    num_classes: int  # classes to predict (for chars: the vocabulary size)
    class_names: list[str]
    in_channels: int = 0
    image_size: tuple[int, int] = (0, 0)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # text and chars: token i is vocabulary[i]; built from the training split only, saved in
    # the run folder (vocab.json) and handed back to `build_data` by every later command
    vocabulary: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Preprocessing:
    """The input preparation pretrained weights expect: images resized (shorter side to
    `resize`), centre-cropped to `crop` x `crop` (image folders), normalised by mean and std."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Prepare(Protocol):
    """A fetched batch -> the tensors a task steps on, on the device. `step` is the training
    step (random augmentation is a function of the run's seed and the step), None in eval."""

    def to(self, device: torch.device) -> Prepare: ...

    def __call__(self, batch: tuple[torch.Tensor, ...], step: int | None) -> tuple[torch.Tensor, ...]: ...


class Inputs(Protocol):
    """How a family reads new inputs for `kdl predict`: the items the given arguments name (files
    in folders, lines of text files), and a batch of some of them as the data's own batches. An
    item is shown as str(item): a text, or the path of a file."""

    def items(self, given: list[str]) -> Sequence[str | Path]: ...

    def batch(self, items: Sequence[str | Path]) -> tuple[torch.Tensor, ...]: ...


@dataclass
class DataBundle:
    train: BatchDataset
    val: BatchDataset | None
    test: BatchDataset | None
    info: DataInfo
    prepare: Prepare
    inputs: Inputs | None = None  # new inputs for `kdl predict`; None: the family reads none
    # device: the splits are stored on the training device and batches are cut there; stream:
    # they stay on the host (or on disk) and batches travel to the device one by one; auto:
    # decided by `to` (see choose_placement)
    placement: str = "auto"

    def to(self, device: torch.device) -> DataBundle:
        """Resident splits move to the training device; streamed ones stay where they are."""
        splits = [split for split in (self.train, self.val, self.test) if split is not None]
        self.placement = choose_placement(self.placement, splits, device)
        if self.placement == "device":
            self.train, self.val, self.test = (
                split.to(device) if split is not None else None
                for split in (self.train, self.val, self.test)
            )
        return self

    def split(self, name: str) -> BatchDataset | None:
        """The split called `name`: train, val or test."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def choose_placement(wanted: str, splits: list[BatchDataset], device: torch.device) -> str:
    """`data.placement`: device or stream as asked; auto: device when every split is held in
    memory (its `nbytes` known: not files decoded per batch) and together they fit in a quarter
    of the device's free memory (the model, activations and optimizer state need the rest)."""
    if wanted != "auto":
        return wanted
    if any(split.nbytes is None for split in splits):
        return "stream"
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if sum(split.nbytes for split in splits) < free // 4 else "stream"


def build_data(cfg: DataConfig, seed: int = 0, vocabulary: list[str] | None = None,
               preprocessing: Preprocessing | None = None) -> DataBundle:
    """The data the `data` branch names, built by its family (its config class's BUILD)."""
    return builder(cfg)(cfg, seed, vocabulary, preprocessing)


def download(name: str, url: str, into: Any, by_hand: str, fetch: Any) -> None:
    """Run `fetch` (a torchvision download); a failure becomes one clear error, ending with how
    to place the files by hand (`by_hand`: "<where> holds <what>")."""
    try:
        fetch()
    # torchvision reports network failures as URLError (an OSError) and a bad md5 as RuntimeError
    except (RuntimeError, OSError) as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise KdlError(
            f"could not download dataset {name!r} from {url} into {into}: {reason}. Fix: check the "
            f"network connection or proxy, or fetch it on another machine so that {by_hand}, then "
            f"set data.download: false."
        ) from exc


def eval_batch_size(cfg: DataConfig) -> int:
    """data.eval_batch_size, else max(batch_size, the family's EVAL_BATCH_MIN, 256 by default:
    bigger batches evaluate faster; character streams keep the training batch size)."""
    return cfg.eval_batch_size or max(cfg.batch_size, cfg.EVAL_BATCH_MIN)


def split_off(num_items: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) with `fraction` held out at random; a pure function of the seed."""
    if fraction == 0:
        return torch.arange(num_items), torch.arange(0)
    # at least one held-out item, so that a tiny dataset never gets an empty val split
    num_held = max(1, round(num_items * fraction))
    if num_held >= num_items:
        raise KdlError(
            f"cannot hold out {fraction:.0%} of {num_items} samples and keep any for training; "
            "lower data.val_fraction or add images"
        )
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    # sorted, so a split reads the source in order (faster for files, same result)
    return order[num_held:].sort().values, order[:num_held].sort().values
