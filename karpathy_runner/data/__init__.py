"""Data registry and the one batch iterator.

A data family module (named by its config class's MODULE) turns its config branch and the run's
seed into a `DataBundle`: train/val/test datasets that fetch whole batches by index
(`get_batch`), `DataInfo` (what the model and the task need to know about shapes and classes),
and `prepare`, which turns a fetched batch into the tensors a task steps on, on the training
device (scaling, normalisation, augmentation). Batch order is a pure function of (seed, epoch),
so a run resumed mid-epoch sees exactly the batches an uninterrupted run would, with or without
DataLoader workers.
"""

from __future__ import annotations

import importlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..distributed import shard
from ..errors import KdlError


class BatchDataset(Protocol):
    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


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


@dataclass
class DataBundle:
    train: BatchDataset
    val: BatchDataset | None
    test: BatchDataset | None
    info: DataInfo
    prepare: Prepare

    def to(self, device: torch.device) -> DataBundle:
        """Splits that keep their data on the training device (a corpus as one int tensor)
        move there; batches are then cut on the device."""
        for split in (self.train, self.val, self.test):
            if split is not None and hasattr(split, "to"):
                split.to(device)
        return self


def build_data(cfg: Any, seed: int = 0, vocabulary: list[str] | None = None,
               preprocessing: Preprocessing | None = None) -> DataBundle:
    """Build the datasets named by the `data` config branch; `seed` is the run's seed. Text and
    character data use `vocabulary` (a run's saved one) instead of building their own; image
    data uses a pretrained model's `preprocessing` instead of its own."""
    module = importlib.import_module(f"{__name__}.{type(cfg).MODULE}")
    if preprocessing is not None:
        return module.build(cfg, seed, vocabulary, preprocessing)
    return module.build(cfg, seed, vocabulary)


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


def eval_batch_size(cfg: Any) -> int:
    """data.eval_batch_size, else max(batch_size, the family's EVAL_BATCH_MIN, 256 by default:
    bigger batches evaluate faster; character streams keep the training batch size)."""
    return cfg.eval_batch_size or max(cfg.batch_size, getattr(cfg, "EVAL_BATCH_MIN", 256))


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch: a pure function of (seed, epoch)."""
    if not shuffle:
        return torch.arange(num_items)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


class _BatchFetcher(torch.utils.data.Dataset):
    """Lets DataLoader workers fetch whole batches: item i is batch i of the epoch."""

    def __init__(self, dataset: BatchDataset, chunks: list[torch.Tensor]):
        self.dataset = dataset
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.dataset.get_batch(self.chunks[i])


class Batches:
    """The batches of a dataset, epoch by epoch, in an order fixed by (seed, epoch).

    `epoch(e, start)` skips the first `start` batches without loading them, which is how a run
    resumed mid-epoch continues exactly where it stopped. With several training processes
    (`world`), each batch is a global one and this process gets its `rank`'s shard of it; a
    last batch with fewer items than processes is left out.
    """

    def __init__(
        self,
        dataset: BatchDataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = False,
        num_workers: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size + (len(self.dataset) % self.batch_size >= self.world)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        chunks = [shard(chunk, self.rank, self.world) for chunk in order.split(self.batch_size)
                  if len(chunk) >= self.world][start:]
        if self.num_workers == 0:
            for chunk in chunks:
                yield self.dataset.get_batch(chunk)
            return
        # an own generator: by default DataLoader draws worker seeds from the global RNG, which
        # would shift dropout masks depending on where an epoch was resumed
        loader = torch.utils.data.DataLoader(
            _BatchFetcher(self.dataset, chunks),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
            worker_init_fn=_leave_signals_to_the_main_process,
        )
        yield from loader


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A terminal's Ctrl-C, or a SIGTERM to the process group, reaches the workers too. By
    default torch's worker dies on SIGTERM and the main process then fails mid-step; instead
    workers ignore both, and the main process finishes its step and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
