"""Kinds of training. A task owns its models, its step, its metrics and its eval; never the loop.

A task family is two pieces: its config class, registered (config/tasks.py for kdl's own: its
options, and as class values the models it trains, its metrics with their direction, and which
models it trains on which data, and BUILD, naming its task class), and its `Task` subclass
(base.py declares every hook with its default), made as `Task(cfg, model_cfg, info, device)`
from its own branch, the model branch, the data's `DataInfo` and the device; never the whole
config.

What the loop asks of a task, and what it gets back:

- `models`: every module the task holds, by name; checkpoints store them all. `trainable` names
  the ones that get an optimizer (the keys of a per-model `optimizer` map); `param_groups(name)`
  splits a model's parameters into groups, each with an `lr_scale` (a backbone at 0.1x). Each
  group's lr is the schedule's value times its scale.
- `train_step(batch, step, updater) -> StepResult`: forward, then `updater.step(name, loss)` once
  per optimizer, in order (a GAN: discriminator, then generator). The forward of the model a
  phase trains goes through `wrapped(name)` (with several processes, its DDP wrapper, which
  averages its gradients; a backward reaches all of its trainable parameters or none). The
  updater does backward, clipping, the optimizer step and the precision policy; with
  `train.on_nonfinite: skip_step` a non-finite loss skips the whole step, undoing any update
  already made in it.
- `eval_step(batch, detailed) -> StepResult` and `summarize(totals, detailed) -> metrics`: the
  loop adds step results up on the device and hands the host totals to `summarize`.
- Hooks, all optional, whose results the loop writes through the run writer:
  `example_inputs(batch)` once when a run starts (TensorBoard), `on_epoch_end(epoch)` after each
  epoch (samples/epoch-NNN.png or .txt), `sample(request)` for `kdl sample`, `predict(batch,
  items, request)` for `kdl predict` (by default the classifier's likeliest classes). And two that keep
  state across batches: `on_epoch_start(epoch)` (not called when a run resumes mid-epoch) and
  `on_eval_start()`; what such state must survive a resume goes in `state_dict()`, which every
  checkpoint holds.
- `ordered_batches`: True when the task needs the training batches in the data's own order (a
  language model carrying its hidden state from one batch to the next), not shuffled.

Batches arrive prepared by the data family (on the device: scaled, normalised, augmented).
"""

from __future__ import annotations

import torch

from ..config.families import ModelConfig, TaskConfig, builder
from ..data import DataInfo
from .base import (
    PREDICT_FLAGS,
    SAMPLE_FLAGS,
    Prediction,
    PredictRequest,
    Sample,
    SampleRequest,
    Task,
    Updater,
)
from .steps import StepResult, Totals

__all__ = ["PREDICT_FLAGS", "SAMPLE_FLAGS", "PredictRequest", "Prediction", "Sample", "SampleRequest",
           "StepResult", "Task", "Totals", "Updater", "build_task"]


def build_task(cfg: TaskConfig, model_cfg: ModelConfig, info: DataInfo, device: torch.device) -> Task:
    """The task the `task` branch names, built by its family (its config class's BUILD)."""
    return builder(cfg)(cfg, model_cfg, info, device)
