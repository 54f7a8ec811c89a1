"""A fast CIFAR-10 network in the spirit of Keller Jordan's airbench94 (written from its
published ideas): a small stem, then conv groups of conv -> pool -> batch norm -> GELU ->
conv -> batch norm -> GELU, a global max pool and a linear head whose logits are scaled down.

What makes it train fast, besides being small and wide:
- batch norm with fast-moving running statistics (momentum 0.4 in torch's convention), no
  learned scale (the conv before it can scale), only a learned shift;
- identity (dirac) initialisation of every 3x3 conv's first input channels, so that at the start
  each group passes its input through and learning starts from a well-conditioned network;
- the shifts (batch-norm biases) learn `bias_lr_scale` times faster than the weights, through
  the model's own parameter groups (`lr_groups`), while every parameter decays by the same
  lr x weight_decay per step (`decay_at_base_lr`), as airbench divides the shifts' decay by
  their lr multiplier;
- logits multiplied by `logit_scale` (1/9), which keeps the early softmax soft at a high lr.

On 32x32 inputs: stem (k=2, no padding) 31x31 -> 15 -> 7 -> 3 -> global max pool -> logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.models import SpeedrunConfig
from ..data import DataInfo
from . import Model


def batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-12)
    norm.weight.requires_grad_(False)  # stays 1: the preceding conv's scale does that job
    return norm


def conv3x3(channels_in: int, channels_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False)
    # identity on the first min(in, out) channels, the default random init on the rest
    with torch.no_grad():
        shared = min(channels_in, channels_out)
        nn.init.dirac_(conv.weight[:shared, :shared])
    return conv


class ConvGroup(nn.Sequential):
    def __init__(self, channels_in: int, channels_out: int, momentum: float):
        super().__init__(
            conv3x3(channels_in, channels_out),
            nn.MaxPool2d(2),
            batch_norm(channels_out, momentum),
            nn.GELU(),
            conv3x3(channels_out, channels_out),
            batch_norm(channels_out, momentum),
            nn.GELU(),
        )


class SpeedrunNet(Model):
    decay_at_base_lr = True

    def __init__(self, in_channels: int, num_classes: int, stem_width: int, widths: list[int],
                 bn_momentum: float, logit_scale: float, bias_lr_scale: float):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem_width, kernel_size=2, bias=False),
            batch_norm(stem_width, bn_momentum),
            nn.GELU(),
        ]
        previous = stem_width
        for width in widths:
            layers.append(ConvGroup(previous, width, bn_momentum))
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes, bias=False)
        self.logit_scale = logit_scale
        self.bias_lr_scale = bias_lr_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)  # (B, C, h, w)
        # (B, C): global max pool. Not amax: its gradient goes to the elements equal to the
        # max, divided by their count, and torch 2.14's compiled bf16 backward on the CPU finds
        # none (count 0: NaN gradients); max's gradient goes to the index it picked
        pooled = features.flatten(2).max(dim=2).values
        return self.head(pooled) * self.logit_scale  # (B, num_classes)

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, lr multiplier) pairs: batch-norm shifts learn faster than the weights."""
        shifts = [m.bias for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        ids = {id(p) for p in shifts}
        weights = [p for p in self.parameters() if id(p) not in ids]
        return [(weights, 1.0), (shifts, self.bias_lr_scale)]


def build(cfg: SpeedrunConfig, info: DataInfo) -> SpeedrunNet:
    return SpeedrunNet(
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        stem_width=cfg.stem_width,
        widths=list(cfg.widths),
        bn_momentum=cfg.bn_momentum,
        logit_scale=cfg.logit_scale,
        bias_lr_scale=cfg.bias_lr_scale,
    )
