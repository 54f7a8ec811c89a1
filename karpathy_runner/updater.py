"""The update of one step: precision (autocast, fp16's gradient scaler), backward (with several
processes, DistributedDataParallel averages the gradients during it), clipping, the optimizer
step, and the non-finite policy (skip the whole step and undo what it already changed)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

from .distributed import SINGLE, Ranks

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for a precision (fp32: none), for training and eval."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class Updater:
    """Backward and optimizer step under the run's precision, scaling, clipping and non-finite
    policy. With `skip_nonfinite`, a non-finite loss skips the whole step: no later update in it
    runs, and updates already made in it (a GAN's discriminator) are undone, weights, optimizer
    state and buffers (batch-norm statistics the bad forward pass touched) alike."""

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        models: list[torch.nn.Module],
        precision: str,
        device: torch.device,
        grad_clip: float | None,
        skip_nonfinite: bool,
        ranks: Ranks = SINGLE,
    ):
        self.optimizers = optimizers
        self.models = models
        self.autocast = autocast_for(precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.grad_clip = grad_clip
        self.skip_nonfinite = skip_nonfinite
        self.ranks = ranks
        self.loss_scale = 1.0  # this rank's share of the global batch (distributed.loss_scale)
        self.skipped = False  # the step in flight met a non-finite loss
        self._stepped = False  # some optimizer stepped in the step in flight
        self._undo: list[Callable[[], None]] = []

    def begin_step(self) -> None:
        self.skipped, self._stepped, self._undo = False, False, []
        if self.skip_nonfinite:
            self._undo.append(_restorer([b for m in self.models for b in m.buffers()]))

    def step(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        if self.skipped:
            return
        # skip_step must look at the loss before updating: the one policy that syncs every step;
        # every rank skips if one must, so that none waits alone in the gradient all-reduce
        if self.skip_nonfinite and not self.ranks.all_true(bool(torch.isfinite(loss.detach()))):
            self.skipped = True  # undone at end_step, after whatever the task still runs
            return
        # backward (averaging the gradients over the ranks, if several: the task's forward went
        # through the model's DDP wrapper)
        self.scaler.scale(loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # clip
        if self.grad_clip is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        # step (remembering what it changes, if a later loss of this step could undo it)
        if self.skip_nonfinite and len(self.optimizers) > 1:
            self._undo.append(_restorer(params, optimizer))
        self.scaler.step(optimizer)
        self._stepped = True

    def end_step(self) -> None:
        """Undo a skipped step; the scaler adapts once per step, after all its optimizers (and
        only if one stepped: it has nothing to adapt to otherwise)."""
        if self.skipped:
            for undo in reversed(self._undo):
                undo()
        if self._stepped:
            self.scaler.update()


def _restorer(tensors: list[torch.Tensor], optimizer: torch.optim.Optimizer | None = None
              ) -> Callable[[], None]:
    """A function that puts `tensors` (and the optimizer's state) back as they are now."""
    saved = [t.detach().clone() for t in tensors]
    state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None

    def restore() -> None:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
        if optimizer is not None:
            optimizer.load_state_dict(state)

    return restore

