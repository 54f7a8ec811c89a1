"""What a task's steps report (`StepResult`), and how a window or an epoch of them adds up on
the device and reaches the host (`Totals`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


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



def reduce_window(window: list[StepResult], total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
            ) -> tuple[Totals, list[bool]]:
    """The window's totals and, per step, whether all its losses were finite: one host sync.
    `total` adds the values up over the ranks (one all-reduce), so every rank gets the same."""
    loss_names, sum_names = list(window[0].losses), list(window[0].sums)
    losses = torch.stack([torch.stack([r.losses[n] for r in window]).float() for n in loss_names],
                         dim=1)  # (steps, losses)
    counts = torch.tensor([r.count for r in window], dtype=torch.float32, device=losses.device)
    nonfinite = (~torch.isfinite(losses).all(dim=1)).float()  # (steps,)
    loss_sums = (losses * counts[:, None]).sum(dim=0)  # (losses,)
    metric_sums = [torch.stack([torch.as_tensor(r.sums[n]) for r in window]).float().sum().to(
        losses.device) for n in sum_names]
    host = total(torch.cat([nonfinite, counts.sum()[None], loss_sums, torch.stack(metric_sums)
                            if metric_sums else loss_sums.new_zeros(0)])).tolist()
    steps = len(window)
    totals = Totals(
        count=host[steps],
        losses=dict(zip(loss_names, host[steps + 1:steps + 1 + len(loss_names)], strict=True)),
        sums=dict(zip(sum_names, host[steps + 1 + len(loss_names):], strict=True)),
    )
    return totals, [f == 0 for f in host[:steps]]


def add_totals(epoch: dict[str, Any], totals: Totals) -> dict[str, Any]:
    """Running epoch totals (plain floats, saved in checkpoints) plus a window's."""
    if not epoch:
        return asdict(totals)
    return {"count": epoch["count"] + totals.count,
            "losses": {k: epoch["losses"][k] + v for k, v in totals.losses.items()},
            "sums": {k: epoch["sums"][k] + v for k, v in totals.sums.items()}}


def totals_of(epoch: dict[str, Any]) -> Totals:
    return Totals(count=epoch["count"], losses=dict(epoch["losses"]), sums=dict(epoch["sums"]))


def moved(tree: Any, device: torch.device) -> Any:
    """A step result's tensors moved to `device` (a checkpoint keeps them on the CPU)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to(device)
    if isinstance(tree, dict):
        return {k: moved(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(moved(v, device) for v in tree)
    return tree
