"""How good an image generator's samples are, measured against real images in the feature space
of a classifier: the Frechet distance between the two sets of features (torchmetrics'
implementation, given our features), a classifier score (the Inception score's analogue: how
confidently and how variously the classifier labels the samples) and class coverage (the share
of the classes that the classifier finds among the samples).

Two classifiers can serve: the penultimate layer of a kdl classification run on the same data
(`kdl eval GAN_RUN --features CNN_RUN`), or torchvision's Inception-v3 when its ImageNet weights
are already in the local torch cache. Every metric's name carries the classifier's, because
numbers from different feature spaces cannot be compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .errors import KdlError


class Features:
    """uint8 images (N, C, H, W) -> (features (N, d), class probabilities (N, classes))."""

    name: str  # goes into every metric's name
    description: str
    dims: int
    num_classes: int

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class RunFeatures(Features):
    """A kdl classifier: its own preprocessing, the input of its last linear layer as features."""

    def __init__(self, run_id: str, model: nn.Module, prepare: Callable, num_classes: int):
        self.model = model.eval()
        self.prepare = prepare
        self.num_classes = num_classes
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        self.dims = last.in_features
        self._captured: list[torch.Tensor] = []
        last.register_forward_hook(lambda module, inputs, output: self._captured.append(inputs[0]))
        self.name = run_id
        self.description = f"the penultimate layer ({self.dims} values) of classification run {run_id}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.zeros(len(images), dtype=torch.int64)
        x, _ = self.prepare((images, labels), None)
        self._captured.clear()
        logits = self.model(x).float()
        return self._captured[0].flatten(1).float(), logits.softmax(1)


INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's IMAGENET1K_V1 weights


def inception_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class InceptionFeatures(Features):
    """torchvision's Inception-v3: images resized to 299, the 2048 pooled features, ImageNet's
    1000 classes. `weights=None` builds it untrained (for tests of the plumbing only)."""

    name = "inception_v3"
    dims = 2048
    num_classes = 1000

    def __init__(self, device: torch.device, weights: str | None = "IMAGENET1K_V1"):
        from torchvision.models import inception_v3

        model = inception_v3(weights=weights, aux_logits=True, init_weights=weights is None)
        self.classify = model.fc
        model.fc = nn.Identity()
        self.model = model.to(device).eval()
        self.device = device
        self.description = "torchvision's Inception-v3 pooled features (2048 values), ImageNet weights"
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device).float().div(255)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # gray -> RGB
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", antialias=True)
        features = self.model((x - self.mean) / self.std).float()
        return features, self.classify.to(self.device)(features).softmax(1)


def inception_features(device: torch.device) -> InceptionFeatures:
    """Inception-v3 with ImageNet weights, from the torch cache only (never a download here)."""
    if not inception_weights().is_file():
        raise KdlError(
            "kdl eval of a GAN scores its samples in a classifier's feature space, and none is at "
            f"hand: Inception-v3's weights are not in the torch cache ({inception_weights()}). Fix: "
            "pass --features RUN, a kdl classification run on the same data (e.g. one of "
            "configs/digits_cnn.yaml for digits), or put torchvision's Inception-v3 ImageNet "
            f"weights ({INCEPTION_FILE}) in that folder."
        )
    return InceptionFeatures(device)


class _GivenFeatures(nn.Identity):
    """Lets torchmetrics' Frechet distance take features we computed (with their size)."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims


def image_quality(real: Iterable[torch.Tensor], generate: Callable[[int], torch.Tensor],
                  features: Features, per_class: bool) -> dict[str, float]:
    """Frechet distance, classifier score and (with `per_class`, when the classifier's classes
    are the data's) class coverage of generated images against `real` uint8 batches; `generate`
    draws as many images as each real batch has."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    distance = FrechetInceptionDistance(feature=_GivenFeatures(features.dims))
    probabilities = []
    for images in real:
        real_features, _ = features(images)
        fake_features, fake_probabilities = features(generate(len(images)))
        distance.update(real_features.double().cpu(), real=True)
        distance.update(fake_features.double().cpu(), real=False)
        probabilities.append(fake_probabilities.double().cpu())
    p_yx = torch.cat(probabilities)  # (N, classes)
    p_y = p_yx.mean(0, keepdim=True)
    kl = (p_yx * (p_yx.clamp_min(1e-12).log() - p_y.clamp_min(1e-12).log())).sum(1)
    metrics = {f"fd@{features.name}": float(distance.compute()),
               f"classifier_score@{features.name}": math.exp(float(kl.mean()))}
    if per_class:
        found = p_yx.argmax(1).unique().numel()
        metrics[f"class_coverage@{features.name}"] = found / features.num_classes
    return metrics
