"""torchvision's detection models: Faster R-CNN (MobileNetV3 FPN), RetinaNet (ResNet-50 FPN)
and SSDlite (MobileNetV3), built for the data's classes (label 0 the background).

The backbone's ImageNet weights are read from the torch cache; a missing file is downloaded
only when the config asks (model.download), else the model starts from random weights and says
so on stderr. The model normalises its inputs itself (torchvision's transform), by the data's
mean and std, and resizes them: R-CNN and RetinaNet to model.min_size (the data's size unless
set), SSDlite to its 320.

In training the network takes (images, targets) and returns its losses by name; in eval it
returns each image's detections (boxes, labels, scores) at the image's own size.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any

from torch import nn

from ..config.models import TorchvisionDetectionConfig
from ..data import DataInfo
from ..errors import KdlError
from .segmentation import cached_file


def build(cfg: TorchvisionDetectionConfig, info: DataInfo) -> nn.Module:
    from torchvision.models import get_model_builder

    builder = get_model_builder(cfg.name)
    backbone = _backbone_weights(cfg, builder)
    size = cfg.min_size or info.image_size[0]
    options: dict[str, Any] = {"image_mean": list(info.mean), "image_std": list(info.std),
                               "detections_per_img": cfg.detections_per_image}
    if cfg.name == "ssdlite320_mobilenet_v3_large":
        options["score_thresh"] = cfg.score_threshold
    else:
        options.update(min_size=size, max_size=size)
        threshold = "box_score_thresh" if cfg.name.startswith("fasterrcnn") else "score_thresh"
        options[threshold] = cfg.score_threshold
    if cfg.name.startswith("fasterrcnn"):
        options.update(rpn_pre_nms_top_n_train=3 * cfg.proposals_per_image,
                       rpn_pre_nms_top_n_test=3 * cfg.proposals_per_image,
                       rpn_post_nms_top_n_train=cfg.proposals_per_image,
                       rpn_post_nms_top_n_test=cfg.proposals_per_image,
                       box_batch_size_per_image=cfg.rois_per_image)
    try:  # torch.hub says "Downloading: ..." on stdout, whose last line is the run id: stderr
        with contextlib.redirect_stdout(sys.stderr):
            net = builder(weights=None, weights_backbone=backbone, num_classes=info.num_classes, **options)
    except (RuntimeError, OSError) as exc:  # the download: no network, a bad file
        raise KdlError(f"model.download: could not get the ImageNet weights of {cfg.name}'s backbone "
                       f"({str(exc).strip().splitlines()[0]}). Check the network, or set model.download: "
                       "false to start from random weights.") from exc
    if cfg.name.startswith("fasterrcnn"):
        net.rpn.anchor_generator = scaled_anchors(net.rpn.anchor_generator, size)
    return net


def scaled_anchors(generator: Any, size: int) -> Any:
    """torchvision's anchors (sides 32 to 512 px) suit images of 320 px and more; smaller ones
    get them scaled by size / 320 (at least 4 px), so that 64 px images with 10 px objects have
    anchors of 6 to 102 px. The same number per location: the RPN head's shapes are kept."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if size >= 320:
        return generator
    sizes = tuple(tuple(max(4, round(side * size / 320)) for side in level) for level in generator.sizes)
    return AnchorGenerator(sizes, generator.aspect_ratios)


def _backbone_weights(cfg: TorchvisionDetectionConfig, builder: Any) -> Any:
    if cfg.weights == "none":
        return None
    weights = inspect.signature(builder).parameters["weights_backbone"].default
    if cfg.download or cached_file(weights).is_file():
        return weights
    print(f"note: the ImageNet weights of {cfg.name}'s backbone are not in the torch cache "
          f"({cached_file(weights)}): the model starts from random weights. Set model.download: true to "
          "fetch them (or put the file there).", file=sys.stderr, flush=True)
    return None
