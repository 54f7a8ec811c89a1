"""Kinds of training. A task owns its models, its step, its metrics and its eval; never the loop.

The trainer hands a task an `Updater` (precision, scaling, clipping, non-finite policy) and asks
it for one train step at a time. A task may hold any number of named models and optimizers
(a GAN has two of each), and checkpoints store them all by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn


class Updater(Protocol):
    """What the trainer offers a task's step (see trainer.Updater)."""

    def autocast(self) -> Any: ...

    def step(self, optimizer: str, loss: torch.Tensor) -> None: ...


class Task:
    """Base class: subclasses set `models` and implement the step, the eval and the metrics."""

    name = "task"
    models: dict[str, nn.Module]
    # metric names this task logs under train.* and val.* (used to check train.best_metric)
    metric_names: tuple[str, ...] = ("loss",)

    def parameters_for(self, optimizer: str) -> Iterator[nn.Parameter]:
        """Parameters each optimizer updates; one optimizer named after each model by default."""
        return self.models[optimizer].parameters()

    def to(self, device: torch.device) -> None:
        for model in self.models.values():
            model.to(device)

    def train(self, mode: bool = True) -> None:
        for model in self.models.values():
            model.train(mode)

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> dict:
        """Forward, backward and update on one batch; return running sums as device tensors."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> dict:
        """Sums for one evaluation batch (no updates)."""
        raise NotImplementedError

    def summarize(self, sums: dict[str, Any], detailed: bool = False) -> dict[str, Any]:
        """Turn summed values (already on the host) into metrics."""
        raise NotImplementedError


def build_task(cfg: Any, info: Any, device: Any) -> Task:
    """Pick the task from what the data is and which model runs on it."""
    if info.kind == "image":
        from .classify import Classify

        return Classify(cfg, info, device)
    raise ValueError(f"no task for data kind {info.kind!r}")
