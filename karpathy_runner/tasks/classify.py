"""Classification: cross-entropy (with optional label smoothing), accuracy; in a detailed eval,
per-class accuracy and a confusion matrix.

A batch is (inputs..., labels): images, or token ids with their lengths; the model takes the
inputs as they come.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..models import build_model
from . import Sample, StepResult, Task, Totals, Updater


class Classify(Task):
    def __init__(self, cfg: Any, model_cfg: Any, info: Any):
        super().__init__(cfg)
        self.models = {"model": build_model(model_cfg, info)}
        self.num_classes = info.num_classes
        self.class_names = info.class_names
        self.vocabulary = info.vocabulary
        self.label_smoothing = cfg.label_smoothing
        self.eval_flip = cfg.eval_flip
        # a pretrained backbone may learn slower than its new head (torchvision models)
        self.backbone_lr_scale = getattr(model_cfg, "backbone_lr_scale", 1.0)

    @property
    def model(self) -> torch.nn.Module:
        return self.models["model"]

    def param_groups(self, model: str) -> list[dict[str, Any]]:
        """With a head (a torchvision model): the backbone at backbone_lr_scale, the head at 1."""
        groups = super().param_groups(model)
        if self.backbone_lr_scale == 1.0 or not hasattr(self.model, "head_parameters"):
            return groups
        head = {id(p) for p in self.model.head_parameters()}
        trainable = groups[0]["params"]
        split = [{"params": [p for p in trainable if id(p) not in head], "lr_scale": self.backbone_lr_scale},
                 {"params": [p for p in trainable if id(p) in head], "lr_scale": 1.0}]
        return [group for group in split if group["params"]]

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


def build(cfg: Any, model_cfg: Any, info: Any, device: torch.device) -> Classify:
    return Classify(cfg, model_cfg, info)
