"""Classification: cross-entropy (with optional label smoothing), accuracy; in a detailed eval,
per-class accuracy and a confusion matrix.

A batch is (inputs..., labels): images, or token ids with their lengths; the model takes the
inputs as they come.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..config.families import ModelConfig
from ..config.tasks import ClassifyConfig
from ..data import DataInfo
from ..models import build_model
from .base import Sample, Task, Updater
from .steps import StepResult, Totals


class Classify(Task):
    def __init__(self, cfg: ClassifyConfig, model_cfg: ModelConfig, info: DataInfo,
                 device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"model": build_model(model_cfg, info)}
        self.num_classes = info.num_classes
        self.class_names = info.class_names
        self.vocabulary = info.vocabulary
        self.label_smoothing = cfg.label_smoothing
        self.eval_flip = cfg.eval_flip

    @property
    def model(self) -> torch.nn.Module:
        return self.models["model"]

    def classifier(self) -> torch.nn.Module:
        return self.model

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        *inputs, y = batch
        # forward
        with updater.autocast():
            logits = self.model(*inputs)  # (B, num_classes)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        # backward and update
        updater.step("model", loss)
        correct = (logits.argmax(1) == y).sum()  # (an argmax has no gradient: no detach)
        return StepResult(count=y.shape[0], losses={"loss": loss.detach()}, sums={"correct": correct})

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        *inputs, y = batch
        logits = self.model(*inputs).float()
        if self.eval_flip:  # the mirror image's opinion counts as much as the image's
            logits = (logits + self.model(inputs[0].flip(3)).float()) / 2
        predicted = logits.argmax(1)
        sums = {"correct": (predicted == y).sum()}
        if detailed:
            pairs = y * self.num_classes + predicted
            sums["confusion"] = torch.bincount(pairs, minlength=self.num_classes**2).view(
                self.num_classes, self.num_classes
            )
        return StepResult(count=y.shape[0], losses={"loss": F.cross_entropy(logits, y)}, sums=sums)

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        metrics = super().summarize(totals)
        metrics["accuracy"] = float(totals.sums["correct"]) / max(totals.count, 1.0)
        if detailed and "confusion" in totals.sums:
            confusion = totals.sums["confusion"].tolist()
            metrics["per_class_accuracy"] = {
                name: (row[i] / sum(row) if sum(row) else None)
                for i, (name, row) in enumerate(zip(self.class_names, confusion, strict=True))
            }
            metrics["confusion_matrix"] = confusion
            metrics["class_names"] = list(self.class_names)
        return metrics

    def example_inputs(self, batch: tuple[torch.Tensor, ...]) -> Sample | None:
        inputs = batch[0]
        if inputs.dtype == torch.uint8 and inputs.ndim == 4:  # (B, C, H, W) images
            return Sample(images=inputs[:32])
        if self.vocabulary:  # token ids (B, T) with their lengths: the first texts, as words
            texts = [" ".join(self.vocabulary[i] for i in row[:length].tolist())
                     for row, length in zip(inputs[:8], batch[1][:8].tolist(), strict=True)]
            return Sample(text="\n\n".join(texts))
        return None

