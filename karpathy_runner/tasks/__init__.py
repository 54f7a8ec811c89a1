"""Kinds of training. A task owns its models, its step, its metrics and its eval; never the loop.

A task family is two pieces: its config branch in config.py (its options, and as class values the
models it trains, its metrics with their direction, and which models it trains on which data)
and a module here whose `build(cfg, model_cfg, info, device)` returns a `Task`. It is built from
its own branch, the model branch, the data's `DataInfo` and the device; never the whole config.

What the loop asks of a task, and what it gets back:

- `models`: every module the task holds, by name; checkpoints store them all. `trainable` names
  the ones that get an optimizer (the keys of a per-model `optimizer` map); `param_groups(name)`
  splits a model's parameters into groups, each with an `lr_scale` (a backbone at 0.1x). Each
  group's lr is the schedule's value times its scale.
- `train_step(batch, step, updater) -> StepResult`: forward, then `updater.step(name, loss)` once
  per optimizer, in order (a GAN: discriminator, then generator). The updater does backward,
  clipping, the optimizer step and the precision policy; with `train.on_nonfinite: skip_step`
  a non-finite loss skips the whole step, undoing any update already made in it.
- `eval_step(batch, detailed) -> StepResult` and `summarize(totals, detailed) -> metrics`: the
  loop adds step results up on the device and hands the host totals to `summarize`.
- Hooks, all optional, whose results the loop writes through the run writer:
  `example_inputs(batch)` once when a run starts (TensorBoard), `on_epoch_end(epoch)` after each
  epoch (samples/epoch-NNN.png or .txt), `sample(request)` for `kdl sample`. And two that keep
  state across batches: `on_epoch_start(epoch)` (not called when a run resumes mid-epoch) and
  `on_eval_start()`; what such state must survive a resume goes in `state_dict()`, which every
  checkpoint holds.
- `ordered_batches`: True when the task needs the training batches in the data's own order (a
  language model carrying its hidden state from one batch to the next), not shuffled.

Batches arrive prepared by the data family (on the device: scaled, normalised, augmented).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import KdlError


@dataclass
class StepResult:
    """What one train or eval step reports, kept on the device until the loop reduces a window.

    `count` is how many items the losses average over and the sums add up (images, tokens);
    `losses` are batch means, every one checked for NaN/inf; `sums` are task metric sums over the
    batch (correct predictions; in a detailed eval, a confusion matrix)."""

    count: int
    losses: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Totals:
    """Step results added up and brought to the host: what `summarize` turns into metrics.
    `losses` are sums of loss x count, so `losses[name] / count` is the mean over items."""

    count: float
    losses: dict[str, float]
    sums: dict[str, Any]  # floats, or host tensors (a confusion matrix)


@dataclass
class Sample:
    """What a task draws: a batch of images (uint8 (N, C, H, W)) or text."""

    images: torch.Tensor | None = None
    text: str | None = None


@dataclass
class SampleRequest:
    """What `kdl sample` asks for; each task uses the fields that apply to it (None: its own
    default). Images: `n`; text: `length`, `temperature`, `top_k`, `prime`. Always `seed`."""

    seed: int = 0
    n: int = 64
    length: int = 500
    temperature: float | None = None
    top_k: int | None = None
    prime: str | None = None


class Updater(Protocol):
    """What the trainer offers a task's step (see trainer.Updater)."""

    skipped: bool  # the step met a non-finite loss and is being skipped

    def autocast(self) -> Any: ...

    def step(self, optimizer: str, loss: torch.Tensor) -> None: ...


class Task:
    """Base class: subclasses set `models` and implement the steps; the rest has defaults."""

    models: dict[str, nn.Module]
    ordered_batches: bool = False

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.name: str = cfg.name
        self.trainable: tuple[str, ...] = type(cfg).MODELS
        # metric -> "min" | "max": which way is better (stored in meta.json)
        self.metrics: dict[str, str] = dict(type(cfg).METRICS)

    def param_groups(self, model: str) -> list[dict[str, Any]]:
        """The parameter groups of one trainable model, each with its lr multiplier: one group,
        or the model's own (`lr_groups()`: (parameters, multiplier) pairs)."""
        module = self.models[model]
        groups = module.lr_groups() if hasattr(module, "lr_groups") else [(module.parameters(), 1.0)]
        return [{"params": [p for p in params if p.requires_grad], "lr_scale": scale}
                for params, scale in groups]

    def to(self, device: torch.device) -> None:
        for model in self.models.values():
            model.to(device)

    def train(self, mode: bool = True) -> None:
        for model in self.models.values():
            model.train(mode)

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        """Forward, backward and update on one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        """Losses and sums for one evaluation batch (no updates)."""
        raise NotImplementedError

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        """Metrics from totals: by default each loss averaged over the items."""
        count = max(totals.count, 1.0)
        return {name: value / count for name, value in totals.losses.items()}

    # ------------------------------------------------------------------ hooks

    def example_inputs(self, batch: tuple[torch.Tensor, ...]) -> Sample | None:
        """Training inputs as the data gives them (before preparation), for TensorBoard."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """A new epoch's first batch is next (not called when resuming mid-epoch)."""

    def on_eval_start(self) -> None:
        """An evaluation pass is about to begin."""

    def on_epoch_end(self, epoch: int) -> Sample | None:
        """Something to keep after each epoch (an image grid, text), or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State outside the models that a resumed run needs (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` gave."""

    def sample(self, request: SampleRequest) -> Sample:
        """New samples as `kdl sample` asks for them."""
        raise KdlError(
            f"a {self.name} run has nothing to sample: `kdl sample` draws from generative runs "
            "(gan, language_model)"
        )


def build_task(cfg: Any, model_cfg: Any, info: Any, device: torch.device) -> Task:
    """The task named by the `task` branch, from its module (the branch class's MODULE)."""
    module = importlib.import_module(f"{__name__}.{type(cfg).MODULE}")
    return module.build(cfg, model_cfg, info, device)
