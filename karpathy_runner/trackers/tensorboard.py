"""TensorBoard event files under a run's tb/ folder, so `tensorboard --logdir runs` works: the
default tracker.

Every metrics record becomes scalars named split/metric (train/loss, val/accuracy, ...) at its
step; image tasks add a grid of example inputs, and every run its config as text and as
hyperparameters (the HParams tab) with its validation and epoch metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .base import NOT_SCALARS, Opening, Tracker


class EventLog(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a resumed run is about to write again
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step, flush_secs=60)

    @classmethod
    def open(cls, opening: Opening) -> EventLog:
        """A fresh run's log starts with its config (text and HParams); a resumed run's drops
        the events after its checkpoint's step, which it is about to write again."""
        if opening.resumed_at is not None:
            return cls(opening.tensorboard, purge_step=opening.resumed_at + 1)
        log = cls(opening.tensorboard)
        log.text("config", opening.config_text)
        log.hparams(opening.setup.params, opening.setup.metric_tags)
        return log

    def record(self, record: dict[str, Any]) -> None:
        split, step = record.get("split", "train"), record.get("step", 0)
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def hparams(self, config: dict[str, Any], metric_tags: list[str]) -> None:
        """The run's flat config (dotted names, as --set writes them) for TensorBoard's HParams
        tab, with the scalar tags it compares runs by (each run's last value of each)."""
        from torch.utils.tensorboard.summary import hparams

        values = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
                  for key, value in config.items()}
        for summary in hparams(values, dict.fromkeys(metric_tags, 0.0)):
            self.writer.file_writer.add_summary(summary)

    def images(self, tag: str, images: torch.Tensor, step: int = 0) -> None:
        """uint8 (B, C, H, W) images as one grid."""
        self.writer.add_images(tag, images, step, dataformats="NCHW")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, f"```\n{text}\n```", step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


TRACKER = EventLog
