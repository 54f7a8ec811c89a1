"""Object detection: boxes and their classes.

A batch is (images (B, 3, S, S) in [0, 1], boxes (B, M, 4) as x0, y0, x1, y1 in pixels, labels
(B, M), ...), label 0 marking a padding slot; each image's targets are its slots with a label
(none: the image is background). The model is one of torchvision's detectors: in training it
returns its losses by name, whose sum is trained (torchvision weighs them 1 each); in eval each
image's detections.

The detections of an evaluation pass are kept in the task (on the host) from `on_eval_start`
to `summarize`, which scores them with torchmetrics' MeanAveragePrecision (COCO's evaluation,
by faster-coco-eval): mAP over IoU 0.5:0.95, mAP at IoU 0.5 and 0.75, and mAR with up to 100
detections per image; a detailed eval (`kdl eval`) adds each class's AP. The loop adds the eval
steps' sums on the device, which holds no lists of boxes, so only the count of images scored
travels that way. `kdl predict` prints each input's boxes (at its own size) as JSON and draws
them on a copy of it, `<name>.png`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ..config.families import ModelConfig
from ..config.tasks import DetectConfig
from ..data import DataInfo
from ..models import build_model
from .base import Prediction, PredictRequest, Task, Updater
from .steps import StepResult, Totals

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


class Detect(Task):
    predict_options = ("out",)

    def __init__(self, cfg: DetectConfig, model_cfg: ModelConfig, info: DataInfo, device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"model": build_model(model_cfg, info)}
        # an eval pass's (detections, targets) per image, on the host, until `summarize`
        self.scored: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    @property
    def model(self) -> torch.nn.Module:
        return self.models["model"]

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        x, boxes, labels = batch[:3]
        # forward
        with updater.autocast():
            losses = self.wrapped("model")(list(x), targets(boxes, labels))
            loss = sum(losses.values())
        # backward and update
        updater.step("model", loss)
        return StepResult(count=x.shape[0], losses={"loss": loss.detach()})

    def on_eval_start(self) -> None:
        self.scored = []

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        x, boxes, labels = batch[:3]
        detections = self.model(list(x))
        for found, truth in zip(detections, targets(boxes, labels), strict=True):
            self.scored.append(({k: v.detach().float().cpu() if k != "labels" else v.cpu()
                                 for k, v in found.items()},
                                {k: v.cpu() for k, v in truth.items()}))
        return StepResult(count=x.shape[0], losses={},
                          sums={"images_scored": torch.tensor(x.shape[0], device=x.device)})

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        metrics = super().summarize(totals)
        if "images_scored" not in totals.sums:  # training: the loss alone
            return metrics
        from torchmetrics.detection import MeanAveragePrecision

        scorer = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=detailed,
                                      backend="faster_coco_eval")
        scorer.update([found for found, _ in self.scored], [truth for _, truth in self.scored])
        scores, self.scored = scorer.compute(), []
        # -1: nothing to score (no box in the split); reported as 0, nothing found
        metrics.update({name: max(float(scores[name]), 0.0)
                        for name in ("map", "map_50", "map_75", "mar_100")})
        if detailed:
            per_class = dict.fromkeys(self.class_names[1:])
            classes = scores["classes"].reshape(-1).tolist()
            for label, ap in zip(classes, scores["map_per_class"].reshape(-1).tolist(), strict=True):
                if 0 < label < len(self.class_names) and ap >= 0:
                    per_class[self.class_names[label]] = ap
            metrics["per_class_ap"] = per_class
        return metrics

    # ------------------------------------------------------------------ kdl predict

    def predicts(self) -> bool:
        return True

    @torch.no_grad()
    def predict(self, batch: tuple[torch.Tensor, ...], items: list[str], request: PredictRequest
                ) -> list[Prediction]:
        """Each input's boxes at its own size (x0, y0, x1, y1 in pixels), likeliest first, and a
        copy of it with them drawn, `<name>.png`."""
        x, sizes = batch[0], batch[-1]  # sizes: (B, 2), each input's (height, width)
        side = x.shape[-1]
        predictions = []
        for item, found, (height, width) in zip(items, self.model(list(x)), sizes.tolist(), strict=True):
            scale = torch.tensor([width / side, height / side] * 2)
            boxes = [{"class": self.class_names[label], "score": round(score, 4),
                      "box": [round(v, 1) for v in (box.cpu() * scale).tolist()]}
                     for box, label, score in zip(found["boxes"], found["labels"].tolist(),
                                                  found["scores"].tolist(), strict=True)]
            path = request.write(f"{Path(item).stem}.png", drawn_png(Path(item), boxes, self.class_names))
            predictions.append(Prediction(
                item, [str(path), *(f"{b['class']} {b['score']:.3f} {b['box']}" for b in boxes[:5])],
                {"drawing": str(path), "boxes": boxes}))
        return predictions


def targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """torchvision's targets: each image's boxes (K, 4) and labels (K,), its slots with a label."""
    return [{"boxes": image_boxes[image_labels > 0], "labels": image_labels[image_labels > 0]}
            for image_boxes, image_labels in zip(boxes, labels, strict=True)]


def drawn_png(image: Path, boxes: list[dict[str, Any]], names: list[str]) -> bytes:
    """The image with each box outlined in its class's colour (`names`: the classes) and
    labelled, as a PNG."""
    from PIL import Image, ImageDraw

    with Image.open(image) as opened:
        picture = opened.convert("RGB")
    draw = ImageDraw.Draw(picture)
    for found in boxes:
        colour = COLOURS[names.index(found["class"]) % len(COLOURS)]
        draw.rectangle(found["box"], outline=colour, width=max(1, round(min(picture.size) / 200)))
        draw.text((found["box"][0] + 2, found["box"][1] + 1), f"{found['class']} {found['score']:.2f}",
                  fill=colour)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
