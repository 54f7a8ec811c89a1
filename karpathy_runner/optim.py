"""Optimizers from plain values, and learning-rate schedules as pure functions of the step.

A schedule that is a function of the step needs no state of its own to resume exactly: the
trainer sets each group's lr from `factor(step)` before every update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def build_optimizer(
    cfg: Any, params: Iterable[torch.nn.Parameter] | list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """`cfg` is the optimizer branch: name, lr, weight_decay and the name's own settings.
    `params` are parameters, or parameter groups (dicts, e.g. with an `lr_scale` for the loop,
    and a `decay_scale`: that group's weight decay is cfg.weight_decay times it)."""
    params = [{**p, "weight_decay": cfg.weight_decay * p["decay_scale"]}
              if isinstance(p, dict) and "decay_scale" in p else p for p in params]
    kernel = _kernel(cfg.name, params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay, **kernel,
        )
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                   weight_decay=cfg.weight_decay, **kernel)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, **kernel,
        )
    raise ValueError(f"unknown optimizer {cfg.name!r}")


FUSED = ("sgd", "adam", "adamw")  # the optimizers torch has one fused kernel for


def _kernel(name: str, params: list[Any]) -> dict[str, bool]:
    """One fused kernel for all parameters where torch has it (CUDA, CPU) instead of a few small
    kernels per parameter; otherwise torch's default (the multi-tensor path on CUDA)."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    if name in FUSED and tensors and {t.device.type for t in tensors} <= {"cuda", "cpu"}:
        return {"fused": True}
    return {}


class LRSchedule:
    """lr multiplier at each optimizer step: linear warm-up, then none|step|cosine|onecycle."""

    def __init__(self, cfg: Any, base_lr: float, steps_per_epoch: int, total_steps: int):
        self.cfg = cfg
        self.base_lr = base_lr
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)

    def factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.name == "onecycle":
            return self._onecycle(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if cfg.name == "step":
            return cfg.gamma ** (step // (cfg.step_size * self.steps_per_epoch))
        if cfg.name == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / span, 1.0)
            floor = cfg.min_lr / self.base_lr
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _onecycle(self, step: int) -> float:
        """Cosine up from lr/div_factor to lr over pct_start, then cosine down to the floor."""
        cfg = self.cfg
        start = 1.0 / cfg.div_factor
        end = start / cfg.final_div_factor
        rise = max(round(cfg.pct_start * self.total_steps), 1)
        if step < rise:
            return _cosine_between(start, 1.0, step / rise)
        return _cosine_between(1.0, end, min((step - rise) / max(self.total_steps - rise, 1), 1.0))

    def lr(self, step: int) -> float:
        return self.base_lr * self.factor(step)


def _cosine_between(first: float, last: float, progress: float) -> float:
    return last + (first - last) * 0.5 * (1.0 + math.cos(math.pi * progress))
