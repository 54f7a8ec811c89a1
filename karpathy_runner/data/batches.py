"""The one batch iterator: batches in an order that is a pure function of (seed, epoch), cut on
the training device for resident data, or fetched by DataLoader workers for streamed data, and
this process's shard of each global batch when several processes train."""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (its exit handler registered before ours)
import signal
import weakref
from collections.abc import Iterator

import torch

from ..distributed import shard
from ..rng import mixed_seed
from .base import BatchDataset


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
        device = self.dataset.device
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
