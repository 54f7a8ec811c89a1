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

import atexit
import importlib
import multiprocessing.util  # noqa: F401  (its exit handler registered before ours)
import signal
import weakref
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


def choose_placement(wanted: str, splits: list[Any], device: torch.device) -> str:
    """`data.placement`: device or stream as asked; auto: device when every split is held in
    memory (its `nbytes` known: not files decoded per batch) and together they fit in a quarter
    of the device's free memory (the model, activations and optimizer state need the rest)."""
    if wanted != "auto":
        return wanted
    if not all(hasattr(split, "nbytes") for split in splits):
        return "stream"
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if sum(split.nbytes for split in splits) < free // 4 else "stream"


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


def mixed_seed(seed: int, value: int) -> int:
    """A generator's seed from the run's seed and an epoch or step, within the 64 bits that
    manual_seed takes, whatever the seed (modulo 2**64 keeps every seed's orders as they were)."""
    return (seed * 1_000_003 + value) % 2**64


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch: a pure function of (seed, epoch), computed on the CPU so
    that every device and every placement sees the same order."""
    if not shuffle:
        return torch.arange(num_items)
    generator = torch.Generator().manual_seed(mixed_seed(seed, epoch))
    return torch.randperm(num_items, generator=generator)


def epoch_chunks(num_items: int, batch_size: int, seed: int, epoch: int, shuffle: bool,
                 rank: int = 0, world: int = 1, device: torch.device | None = None) -> list[torch.Tensor]:
    """This process's part of each global batch of an epoch: the (seed, epoch) order cut into
    batches, a last batch with fewer items than processes left out, and rank `rank`'s shard of
    each (all of it for one process)."""
    order = epoch_order(num_items, seed, epoch, shuffle)
    if device is not None:
        order = order.to(device)
    return [shard(chunk, rank, world) for chunk in order.split(batch_size) if len(chunk) >= world]


class _EpochBatches(torch.utils.data.Sampler):
    """Keys (epoch, batch) of the batches still to come in the current epoch; `Batches` sets
    them before each pass, so one loader (and its persistent workers) serves every epoch."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)


class _BatchFetcher(torch.utils.data.Dataset):
    """Lets DataLoader workers fetch whole batches: key (epoch, i) is batch i of that epoch,
    cut from the epoch's order, which each worker computes once per epoch."""

    def __init__(self, batches: Batches):
        self.dataset = batches.dataset
        self.batch_size, self.seed, self.shuffle = batches.batch_size, batches.seed, batches.shuffle
        self.rank, self.world = batches.rank, batches.world
        self._chunks: tuple[int, list[torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, i = key
        if self._chunks is None or self._chunks[0] != epoch:
            self._chunks = (epoch, epoch_chunks(len(self.dataset), self.batch_size, self.seed, epoch,
                                                self.shuffle, self.rank, self.world))
        return self.dataset.get_batch(self._chunks[1][i])


class Batches:
    """The batches of a dataset, epoch by epoch, in an order fixed by (seed, epoch).

    `epoch(e, start)` skips the first `start` batches without loading them, which is how a run
    resumed mid-epoch continues exactly where it stopped.

    Data resident on the training device is cut there, in the main process: one indexing op per
    batch. Streamed data (`stream=True`) goes through a DataLoader: `num_workers` persistent
    worker processes fetch batches ahead, into pinned memory when `pin_memory` (a CUDA device),
    so that the copy to the device does not wait on the host.
    With several training processes
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
        stream: bool = False,
        pin_memory: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.stream = stream or num_workers > 0
        self.pin_memory = pin_memory
        self._sampler: _EpochBatches | None = None
        self._loader: torch.utils.data.DataLoader | None = None
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size + (len(self.dataset) % self.batch_size >= self.world)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.stream:
            yield from self._streamed(epoch, start)
            return
        # one copy of the order to where the data lives; every batch is then cut there
        device = getattr(self.dataset, "device", None)
        for chunk in epoch_chunks(len(self.dataset), self.batch_size, self.seed, epoch, self.shuffle,
                                  self.rank, self.world, device)[start:]:
            yield self.dataset.get_batch(chunk)

    def close(self) -> None:
        """The DataLoader's worker processes asked to stop, and joined (a later epoch starts
        new ones). torch stops them when it collects the loader; a loader still held as the
        interpreter exits is closed by `_close_streams`."""
        loader, self._loader = self._loader, None
        # (torch has no public close for persistent workers: its iterator's own shutdown)
        stop = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if stop is not None:
            stop()

    def _streamed(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        if self._loader is None:
            _STREAMS.add(self)
            self._sampler = _EpochBatches()
            # an own generator: by default DataLoader draws worker seeds from the global RNG,
            # which would shift dropout masks depending on where an epoch was resumed
            self._loader = torch.utils.data.DataLoader(
                _BatchFetcher(self),
                sampler=self._sampler,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(mixed_seed(self.seed, 0)),
                worker_init_fn=_leave_signals_to_the_main_process,
            )
        self._sampler.keys = [(epoch, i) for i in range(start, len(self))]
        yield from self._loader


_STREAMS: weakref.WeakSet[Batches] = weakref.WeakSet()  # those with a DataLoader, maybe workers


@atexit.register  # after multiprocessing's own exit handler (imported above), so run before it
def _close_streams() -> None:
    """At the interpreter's exit, the workers of every loader still held are asked to stop.
    multiprocessing's exit handler would send them SIGTERM, which they ignore (below), and
    wait for them forever."""
    for batches in list(_STREAMS):
        batches.close()


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A terminal's Ctrl-C, or a SIGTERM to the process group, reaches the workers too. By
    default torch's worker dies on SIGTERM and the main process then fails mid-step; instead
    workers ignore both, and the main process finishes its step and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
