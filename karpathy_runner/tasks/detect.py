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
them on a copy of it, `<name>.png`. `kdl export` writes the detector scripted (TorchScript
only: torch.export, under the other formats, cannot take its data-dependent box counts), taking
uint8 images and giving each one's detections padded to a fixed number of rows.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ..config.families import ModelConfig
from ..config.tasks import DetectConfig
from ..data import DataInfo, Prepare
from ..models import build_model
from .base import Export, Prediction, PredictRequest, Task, Updater
from .steps import StepResult, Totals

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


class Detect(Task):
    predict_options = ("out",)

    def __init__(self, cfg: DetectConfig, model_cfg: ModelConfig, info: DataInfo, device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"model": build_model(model_cfg, info)}
        self.slots = model_cfg.detections_per_image  # the most detections of an image
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
        scored, self.scored = self.scored, []
        return {**metrics, **scores(scored, self.class_names, detailed)}

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

    # ------------------------------------------------------------------ kdl export

    def export(self, batch: tuple[torch.Tensor, ...], prepare: Prepare) -> Export:
        """The detector scripted, with the data's scaling: uint8 images (N, 3, S, S) ->
        detections (N, D, 6), each row x0, y0, x1, y1 (pixels), score, class; likeliest first,
        class 0 in the rows beyond an image's detections."""
        images = batch[0]
        side = images.shape[-1]
        metadata = {"task": self.name, "class_names": list(self.class_names), "image_size": [side, side],
                    "channels": 3, "inputs": {"images": f"uint8 (N, 3, {side}, {side}): pixels 0-255, "
                                                        "resized to that size first"},
                    "outputs": {"detections": f"float32 (N, {self.slots}, 6): x0, y0, x1, y1 in the "
                                              "input's pixels, score, class index (0: no detection)"},
                    "loading": "import torchvision before torch.jit.load: the file calls its nms operator"}

        def reference(*given: torch.Tensor) -> torch.Tensor:
            rest = tuple(t[:len(given[0])] for t in batch[1:])
            return padded(self.model(list(prepare((given[0], *rest), None)[0])), self.slots)

        module = torch.jit.script(Detections(self.model, self.slots).eval())
        return Export(module, (images,), ("images",), ("detections",), reference, metadata, "images",
                      ("torchscript",), "torch.export, which the exported-program and ONNX formats go "
                      "through, cannot follow a detector's data-dependent numbers of boxes")


class Detections(torch.nn.Module):
    """uint8 images -> detections padded to `slots` rows (what `Detect.export` writes)."""

    def __init__(self, model: torch.nn.Module, slots: int):
        super().__init__()
        self.model = model
        self.slots = slots

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        found = self.model(list((images.float() / 255).unbind(0)))
        if torch.jit.is_scripting():  # a scripted detector gives (losses, detections)
            found = found[1]
        return padded(found, self.slots)


def padded(found: list[dict[str, torch.Tensor]], slots: int) -> torch.Tensor:
    """Each image's detections as `slots` rows of x0, y0, x1, y1, score, class; (N, slots, 6)."""
    out = torch.zeros(len(found), slots, 6)
    for i, image in enumerate(found):
        count = image["boxes"].shape[0]
        out[i, :count, :4] = image["boxes"].detach().float()
        out[i, :count, 4] = image["scores"].detach().float()
        out[i, :count, 5] = image["labels"].float()
    return out


def scores(scored: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], class_names: list[str],
           detailed: bool = False) -> dict[str, Any]:
    """COCO's box metrics of (detections, targets) per image, by torchmetrics; with `detailed`,
    each class's AP (None: the class has no box in the split)."""
    from torchmetrics.detection import MeanAveragePrecision

    scorer = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=detailed,
                                  backend="faster_coco_eval")
    scorer.update([found for found, _ in scored], [truth for _, truth in scored])
    computed = scorer.compute()
    # -1: nothing to score (no box in the split); reported as 0, nothing found
    metrics: dict[str, Any] = {name: max(float(computed[name]), 0.0)
                               for name in ("map", "map_50", "map_75", "mar_100")}
    if detailed:
        per_class = dict.fromkeys(class_names[1:])
        classes = computed["classes"].reshape(-1).tolist()
        for label, ap in zip(classes, computed["map_per_class"].reshape(-1).tolist(), strict=True):
            if 0 < label < len(class_names) and ap >= 0:
                per_class[class_names[label]] = ap
        metrics["per_class_ap"] = per_class
    return metrics


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
