"""Image classification: cross-entropy, accuracy, per-class accuracy and a confusion matrix.

Batches arrive as uint8 images; scaling, augmentation (random crop with padding, flip) and
normalisation happen here, on the training device, on whole batches. Augmentation draws from a
generator seeded by (seed, step), so it does not depend on workers or on where a run resumed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..models import build_model
from . import Task, Updater


class Classify(Task):
    name = "classify"
    metric_names = ("loss", "accuracy")

    def __init__(self, cfg: Any, info: Any, device: torch.device):
        self.models = {"model": build_model(cfg.model, info)}
        self.num_classes = info.num_classes
        self.class_names = info.class_names
        self.seed = cfg.seed
        self.augment = tuple(cfg.data.augment)
        self.crop_padding = cfg.data.crop_padding
        self.device = device
        shape = (1, len(info.mean), 1, 1)
        self.mean = torch.tensor(info.mean, dtype=torch.float32).view(shape).to(device)
        self.std = torch.tensor(info.std, dtype=torch.float32).view(shape).to(device)

    @property
    def model(self) -> torch.nn.Module:
        return self.models["model"]

    def prepare(self, batch: tuple[torch.Tensor, ...], step: int | None) -> tuple[torch.Tensor, ...]:
        """uint8 (B, C, H, W) -> normalised float on the device; augmented when `step` is given."""
        images, labels = batch
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        y = labels.to(self.device, non_blocking=True)
        if step is not None and self.augment:
            generator = torch.Generator(device=self.device).manual_seed(
                self.seed * 1_000_003 + step + 1
            )
            x = augment_batch(x, self.augment, self.crop_padding, generator)
        return x.sub_(self.mean).div_(self.std), y

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> dict:
        x, y = self.prepare(batch, step)
        # forward
        with updater.autocast():
            logits = self.model(x)  # (B, num_classes)
            loss = F.cross_entropy(logits, y)
        # backward and update
        updater.step("model", loss)
        return {
            "loss": loss.detach() * y.shape[0],
            "correct": (logits.detach().argmax(1) == y).sum(),
            "count": y.shape[0],
        }

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> dict:
        x, y = self.prepare(batch, None)
        logits = self.model(x).float()
        predicted = logits.argmax(1)
        sums = {
            "loss": F.cross_entropy(logits, y, reduction="sum"),
            "correct": (predicted == y).sum(),
            "count": y.shape[0],
        }
        if detailed:
            pairs = y * self.num_classes + predicted
            sums["confusion"] = torch.bincount(pairs, minlength=self.num_classes**2).view(
                self.num_classes, self.num_classes
            )
        return sums

    def summarize(self, sums: dict[str, Any], detailed: bool = False) -> dict[str, Any]:
        count = max(float(sums["count"]), 1.0)
        metrics = {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}
        if detailed and "confusion" in sums:
            confusion = sums["confusion"].tolist()
            metrics["per_class_accuracy"] = {
                name: (row[i] / sum(row) if sum(row) else None)
                for i, (name, row) in enumerate(zip(self.class_names, confusion, strict=True))
            }
            metrics["confusion_matrix"] = confusion
            metrics["class_names"] = list(self.class_names)
        return metrics


def augment_batch(
    x: torch.Tensor, augment: tuple[str, ...], padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with zero padding and/or horizontal flip, per sample, on the whole batch."""
    batch, _, height, width = x.shape
    if "crop" in augment and padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        shift = torch.randint(0, 2 * padding + 1, (2, batch), device=x.device, generator=generator)
        rows = torch.arange(height, device=x.device).unsqueeze(0) + shift[0].unsqueeze(1)  # (B, H)
        cols = torch.arange(width, device=x.device).unsqueeze(0) + shift[1].unsqueeze(1)  # (B, W)
        index = torch.arange(batch, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2).contiguous()
    if "flip" in augment:
        flip = torch.rand(batch, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x
