"""Semantic segmentation: a class for every pixel.

A batch is (images (B, 3, H, W), masks (B, H, W) of class indices, ...); pixels marked with the
ignore index (255) count for nothing: not in the loss, not in the metrics. The model returns the
logits (B, num_classes, H, W), or torchvision's dict of them ("out", and "aux" from an auxiliary
head, whose loss counts task.aux_weight times).

Training reports the loss and pixel accuracy. An evaluation adds up a confusion matrix of pixels
on the device (rows: the true class, columns: the predicted one), from which `summarize` gives
pixel accuracy, mean IoU and, in a detailed eval (`kdl eval`), each class's IoU. IoU is
TP / (TP + FP + FN); mIoU averages it over the classes present in the labels or the predictions
(a class in neither has no IoU). `kdl predict` writes each input's mask as a palette PNG (VOC's
colours, a pixel's value its class) at the input's own size.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config.families import ModelConfig
from ..config.tasks import SegmentConfig
from ..data import DataInfo, Prepare
from ..data.image_sets import ImagePrep
from ..data.segmentation import IGNORE_INDEX, voc_palette
from ..models import build_model
from .base import Export, Prediction, PredictRequest, Task, Updater
from .classify import Prepared
from .steps import StepResult, Totals


class Segment(Task):
    predict_options = ("out",)

    def __init__(self, cfg: SegmentConfig, model_cfg: ModelConfig, info: DataInfo, device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"model": build_model(model_cfg, info)}
        self.num_classes = info.num_classes
        self.aux_weight = cfg.aux_weight
        self.info = info

    @property
    def model(self) -> torch.nn.Module:
        return self.models["model"]

    def _logits(self, x: torch.Tensor, network: torch.nn.Module | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, num_classes, H, W), the auxiliary head's or None), from the model or
        `network` (a training step's: its wrapper)."""
        outputs = (self.model if network is None else network)(x)
        if isinstance(outputs, dict):  # torchvision's models
            return outputs["out"], outputs.get("aux")
        return outputs, None

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        x, masks = batch[:2]
        labelled = masks != IGNORE_INDEX  # (B, H, W)
        # forward
        with updater.autocast():
            logits, aux = self._logits(x, self.wrapped("model"))
            loss = pixel_loss(logits, masks, labelled)
            if aux is not None:
                loss = loss + self.aux_weight * pixel_loss(aux, masks, labelled)
        # backward and update
        updater.step("model", loss)
        correct = ((logits.argmax(1) == masks) & labelled).sum()
        return StepResult(count=x.shape[0], losses={"loss": loss.detach()},
                          sums={"correct": correct, "labelled": labelled.sum()})

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        x, masks = batch[:2]
        logits = self._logits(x)[0].float()
        confusion = multiclass_confusion_matrix(logits.argmax(1), masks, self.num_classes,
                                                ignore_index=IGNORE_INDEX, validate_args=False)
        return StepResult(count=x.shape[0], losses={"loss": pixel_loss(logits, masks, masks != IGNORE_INDEX)},
                          sums={"confusion": confusion})  # (num_classes, num_classes)

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        metrics = super().summarize(totals)
        sums = totals.sums
        if "confusion" not in sums:  # training: the steps' pixel counts
            metrics["pixel_accuracy"] = float(sums["correct"]) / max(float(sums["labelled"]), 1.0)
            return metrics
        confusion = sums["confusion"].double()  # rows: true class, columns: predicted
        hits = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hits  # 0: the class is in neither
        iou = hits / union.clamp_min(1)
        metrics["pixel_accuracy"] = float(hits.sum() / confusion.sum().clamp_min(1))
        # (no labelled pixel at all: no class has an IoU, and nothing was right)
        metrics["miou"] = float(iou[union > 0].mean()) if bool((union > 0).any()) else 0.0
        if detailed:
            metrics["per_class_iou"] = {name: float(iou[i]) if union[i] > 0 else None
                                        for i, name in enumerate(self.class_names)}
        return metrics

    # ------------------------------------------------------------------ kdl predict

    def predicts(self) -> bool:
        return True

    @torch.no_grad()
    def predict(self, batch: tuple[torch.Tensor, ...], items: list[str], request: PredictRequest
                ) -> list[Prediction]:
        """Each input's mask at its own size (the logits resized bilinearly, as torchvision's
        models do), written as `<name>.png`; shown with the share of each class found."""
        x, _, sizes = batch  # sizes: (B, 2), each input's (height, width)
        logits = self._logits(x)[0].float()
        predictions = []
        for item, scores, (height, width) in zip(items, logits, sizes.tolist(), strict=True):
            scores = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)
            mask = scores[0].argmax(0).to(torch.uint8).cpu().numpy()  # (H, W)
            path = request.write(f"{Path(item).stem}.png", mask_png(mask))
            shares = (np.bincount(mask.ravel(), minlength=self.num_classes) / mask.size).tolist()
            found = sorted(((share, name) for name, share in zip(self.class_names, shares, strict=True)
                            if share > 0), reverse=True)
            predictions.append(Prediction(
                item, [str(path), *(f"{name} {share:.3f}" for share, name in found)],
                {"mask": str(path), "classes": [{"class": name, "share": round(share, 6)}
                                                for share, name in found]}))
        return predictions

    # ------------------------------------------------------------------ kdl export

    def export(self, batch: tuple[torch.Tensor, ...], prepare: Prepare) -> Export:
        """The model with the data's preparation: uint8 images (N, C, S, S), normalised inside as
        in eval, -> logits (N, classes, S, S); a pixel's class is their argmax."""
        images, masks = batch[:2]
        info = self.info
        module = Prepared(self.model, ImagePrep(info.mean, info.std, (), 0, 0)).eval()
        height, width = info.image_size
        metadata = {"task": self.name, "class_names": list(self.class_names), "image_size": [height, width],
                    "channels": info.in_channels, "mean": list(info.mean), "std": list(info.std),
                    "inputs": {"images": f"uint8 (N, {info.in_channels}, {height}, {width}): pixels "
                                         "0-255, resized to that size first, normalised inside"},
                    "outputs": {"logits": f"float32 (N, {self.num_classes}, {height}, {width}): "
                                          "argmax over dimension 1 for each pixel's class"}}

        def reference(*given: torch.Tensor) -> torch.Tensor:
            return self._logits(prepare((given[0], masks[:len(given[0])]), None)[0])[0].float()

        return Export(module, (images,), ("images",), ("logits",), reference, metadata, "images")


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (0, not NaN, for a batch without any)."""
    total = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / labelled.sum().clamp_min(1)


def mask_png(mask: np.ndarray) -> bytes:
    """A mask of class indices as a palette PNG with Pascal VOC's colours."""
    from PIL import Image

    picture = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    picture.putpalette(voc_palette())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
