"""torchvision's segmentation models: FCN, DeepLabV3 and LR-ASPP on their backbones.

The model is built by torchvision's own builder (torchvision.models.segmentation) from
torchvision's published weights of the whole model (COCO images, VOC's 21 classes), the
backbone's ImageNet weights, or none. Weights are read from the torch cache; a missing file is
downloaded only when the config asks (model.download), else the model starts from what is
cached (the backbone's, or random weights) and says so on stderr, so that nothing reaches for
the network unasked. With the whole model's weights and another number of classes, the last
convolution of each head is replaced by one for the data's classes.

The network returns torchvision's dict: "out", the logits (B, num_classes, H, W) at the input's
size, and "aux" from the auxiliary head when it has one.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..config.models import TorchvisionSegmentationConfig
from ..data import DataInfo, Preprocessing
from ..errors import KdlError
from . import Model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEADS = ("classifier", "aux_classifier")  # the modules whose last convs give the class logits


class TorchvisionSegmenter(Model):
    """A torchvision segmentation model (`net`); its backbone may learn slower."""

    def __init__(self, net: nn.Module, backbone_lr_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.backbone_lr_scale = backbone_lr_scale

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.net(x))  # {"out": (B, num_classes, H, W), "aux": ... with an aux head}

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The backbone at backbone_lr_scale, the heads at the optimizer's lr."""
        if self.backbone_lr_scale == 1.0:
            return super().lr_groups()
        backbone = {id(p) for p in self.net.backbone.parameters()}
        return [([p for p in self.parameters() if id(p) in backbone], self.backbone_lr_scale),
                ([p for p in self.parameters() if id(p) not in backbone], 1.0)]


def preprocessing() -> Preprocessing:
    """The normalisation torchvision's weights were trained with (ImageNet's); the sizes are
    the data's own, so resize and crop are torchvision's for the record only."""
    return Preprocessing(resize=520, crop=520, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def cached_file(weights: Any) -> Path:
    """Where torch.hub keeps a weights file (torchvision's weights API loads it from there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def build(cfg: TorchvisionSegmentationConfig, info: DataInfo) -> TorchvisionSegmenter:
    import torchvision.models.segmentation as segmentation
    from torchvision.models import get_model_weights

    arch = f"{cfg.name}_{cfg.backbone}"
    builder = getattr(segmentation, arch)
    whole, backbone = _weights(cfg, arch, get_model_weights(arch).DEFAULT,
                               inspect.signature(builder).parameters["weights_backbone"].default)
    options: dict[str, Any] = {}  # with the whole model's weights, torchvision's own classes and heads
    if whole is None:
        options["num_classes"] = info.num_classes
        if cfg.name != "lraspp":
            options["aux_loss"] = cfg.aux_loss
    try:  # torch.hub says "Downloading: ..." on stdout, whose last line is the run id: stderr
        with contextlib.redirect_stdout(sys.stderr):
            net = builder(weights=whole, weights_backbone=backbone, **options)
    except (RuntimeError, OSError) as exc:  # the download: no network, a bad file
        raise KdlError(
            f"model.download: could not get torchvision's {arch} weights "
            f"({str(exc).strip().splitlines()[0]}). Check the network, or set model.download: false "
            "to start from what the torch cache holds."
        ) from exc
    if whole is not None:
        _replace_heads(net, info.num_classes)
        if not cfg.aux_loss and getattr(net, "aux_classifier", None) is not None:
            net.aux_classifier = None  # (the weights come with one; this run trains none)
    return TorchvisionSegmenter(net, cfg.backbone_lr_scale)


def _weights(cfg: TorchvisionSegmentationConfig, arch: str, whole: Any, backbone: Any
             ) -> tuple[Any | None, Any | None]:
    """(the whole model's weights, the backbone's) to build with: as asked, when cached or
    model.download allows; else the next best that is cached, with a note on stderr."""
    if cfg.weights == "none":
        return None, None
    if cfg.weights == "full" and (cfg.download or cached_file(whole).is_file()):
        return whole, None
    if cfg.download or cached_file(backbone).is_file():
        if cfg.weights == "full":
            _note(f"torchvision's {arch} weights are not in the torch cache ({cached_file(whole)}): the "
                  "model starts from its backbone's ImageNet weights")
        return None, backbone
    missing = [cached_file(whole)] if cfg.weights == "full" else []
    _note(f"torchvision's weights for {arch} are not in the torch cache "
          f"({' nor '.join(map(str, [*missing, cached_file(backbone)]))}): the model starts from random "
          "weights")
    return None, None


def _note(text: str) -> None:
    print(f"note: {text}. Set model.download: true to fetch them (or put the files there).",
          file=sys.stderr, flush=True)


def _replace_heads(net: nn.Module, num_classes: int) -> None:
    """The class-logit convs of the heads (the last conv of each, 21 outputs for VOC's classes)
    made anew for `num_classes`; the rest keeps its weights."""
    for name, module in list(net.named_modules()):
        if (name.split(".")[0] in HEADS and isinstance(module, nn.Conv2d)
                and module.out_channels != num_classes and module.out_channels == 21):
            net.set_submodule(name, nn.Conv2d(module.in_channels, num_classes, module.kernel_size,
                                              stride=module.stride, padding=module.padding))
