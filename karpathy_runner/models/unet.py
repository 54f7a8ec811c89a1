"""A small U-Net (Ronneberger et al., 2015) for segmentation from scratch.

Each level is two 3x3 convs (same padding, so only pooling changes the size) with batch norm
and ReLU; the encoder halves the size between levels with a 2x2 max pool, the decoder doubles
it with a 2x2 transposed conv and joins the encoder's features of that size (concatenated)
before its two convs. A 1x1 conv gives every pixel its class logits. Sides that do not divide
by 2**(levels-1) are padded for the pass and cropped back, so any image size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.models import UNetConfig
from ..data import DataInfo
from . import Model


def _level(channels_in: int, channels_out: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for previous in (channels_in, channels_out):
        layers.append(nn.Conv2d(previous, channels_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(Model):
    def __init__(self, in_channels: int, num_classes: int, channels: list[int], batch_norm: bool = True):
        super().__init__()
        widths = [in_channels, *channels]
        self.down = nn.ModuleList(_level(a, b, batch_norm) for a, b in zip(widths[:-1], widths[1:],
                                                                             strict=True))
        self.rise = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2)
                                  for a, b in zip(channels[:-1], channels[1:], strict=True))
        self.up = nn.ModuleList(_level(2 * a, a, batch_norm) for a in channels[:-1])
        self.head = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2 ** (len(self.down) - 1)
        x = F.pad(x, (0, -width % multiple, 0, -height % multiple))
        skips = []
        for index, level in enumerate(self.down):
            x = level(x if index == 0 else F.max_pool2d(x, 2))
            skips.append(x)  # (B, channels[i], H / 2**i, W / 2**i)
        for rise, level, skip in zip(reversed(self.rise), reversed(self.up), reversed(skips[:-1]),
                                     strict=True):
            x = level(torch.cat([skip, rise(x)], dim=1))
        return self.head(x)[..., :height, :width]  # (B, num_classes, H, W)


def build(cfg: UNetConfig, info: DataInfo) -> UNet:
    return UNet(info.in_channels, info.num_classes, list(cfg.channels), cfg.batch_norm)
