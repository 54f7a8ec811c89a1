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
from ..data import DataInfo, Prepare
from ..data.image_sets import ImagePrep
from ..models import Model, build_model
from .base import Export, Sample, Task, Updater
from .steps import StepResult, Totals


class Classify(Task):
    def __init__(self, cfg: ClassifyConfig, model_cfg: ModelConfig, info: DataInfo,
                 device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"model": build_model(model_cfg, info)}
        self.num_classes = info.num_classes
        self.class_names = info.class_names
        self.vocabulary = info.vocabulary
        self.info = info
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
            logits = self.wrapped("model")(*inputs)  # (B, num_classes)
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

    def export(self, batch: tuple[torch.Tensor, ...], prepare: Prepare) -> Export:
        """The classifier with the data's preparation: uint8 images (N, C, H, W) scaled and
        normalised as in eval (no flip), or token ids (N, T) and their lengths (N,) -> logits."""
        *inputs, labels = batch
        model = self.model.exportable() if isinstance(self.model, Model) else self.model
        info, common = self.info, {"task": self.name, "class_names": list(self.class_names),
                                   "outputs": {"logits": "float32 (N, classes): softmax for probabilities"}}
        if self.vocabulary:
            tokens, lengths = inputs
            names = ("tokens", "lengths")
            metadata = {**common, "vocabulary": list(self.vocabulary), "inputs": {
                "tokens": f"int64 (N, {tokens.shape[1]}): each word's index in the vocabulary (1 for "
                          "a word not in it), padded with 0 after the text",
                "lengths": "int64 (N,): the words of each text, 1 up"}}
        else:
            names = ("images",)
            model = Prepared(model, ImagePrep(info.mean, info.std, (), 0, 0))
            metadata = {**common, "image_size": list(info.image_size), "channels": info.in_channels,
                        "mean": list(info.mean), "std": list(info.std), "inputs": {
                            "images": f"uint8 (N, {info.in_channels}, {info.image_size[0]}, "
                                      f"{info.image_size[1]}): pixels 0-255, normalised inside"}}

        def reference(*given: torch.Tensor) -> torch.Tensor:
            return self.model(*prepare((*given, labels[:len(given[0])]), None)[:-1]).float()

        return Export(model.eval(), tuple(inputs), names, ("logits",), reference, metadata,
                      "texts" if self.vocabulary else "images")


class Prepared(torch.nn.Module):
    """uint8 images -> the model's logits, scaled and normalised in the one op of ImagePrep, with
    its constants: what the data's preparation gives in eval, bit for bit."""

    def __init__(self, model: torch.nn.Module, prep: ImagePrep):
        super().__init__()
        self.model = model
        self.register_buffer("scale", prep.scale)
        self.register_buffer("shift", prep.shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.model(torch.addcmul(self.shift, images.float(), self.scale))
        return outputs["out"] if isinstance(outputs, dict) else outputs  # (torchvision's segmenters)
