"""Data: the families that turn their config branch and the run's seed into a `DataBundle`
(images.py, text.py, chars.py), what every family gives (base.py), and the one batch iterator
(batches.py).

A bundle holds train/val/test datasets that fetch whole batches by index (`get_batch`),
`DataInfo` (what the model and the task need to know about shapes and classes), and `prepare`,
which turns a fetched batch into the tensors a task steps on, on the training device (scaling,
normalisation, augmentation). Batch order is a pure function of (seed, epoch), so a run resumed
mid-epoch sees exactly the batches an uninterrupted run would, with or without DataLoader
workers.
"""

from __future__ import annotations

from .base import (
    BatchDataset,
    DataBundle,
    DataInfo,
    Inputs,
    Prepare,
    Preprocessing,
    build_data,
    choose_placement,
    download,
    eval_batch_size,
)
from .batches import Batches, epoch_chunks, epoch_order

__all__ = ["BatchDataset", "Batches", "DataBundle", "DataInfo", "Inputs", "Prepare", "Preprocessing",
           "build_data", "choose_placement", "download", "epoch_chunks", "epoch_order", "eval_batch_size"]
