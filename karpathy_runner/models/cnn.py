"""A configurable conv stack for image classification.

With channels [32, 64], kernel 3, max pooling and no hidden layer this is the seed network:
conv 3->32, pool, conv 32->64, pool, linear 64*8*8 -> 10 on 32x32 inputs. The seed listing had
two bugs, fixed here: its convs had no padding (so 64*8*8 did not match the feature map), and it
applied ReLU to the logits (which clips every negative score to zero).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.models import CNNConfig
from ..data import DataInfo
from . import Model


class CNN(Model):
    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        channels: list[int],
        kernel_size: int = 3,
        batch_norm: bool = False,
        pool: str = "max",
        dropout: float = 0.0,
        hidden: list[int] | None = None,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        height, width = image_size
        previous = in_channels
        for width_out in channels:
            # padding k//2 keeps H and W, so only pooling changes the size
            layers.append(nn.Conv2d(previous, width_out, kernel_size, padding=kernel_size // 2,
                                    bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width_out))
            layers.append(nn.ReLU(inplace=True))
            if pool != "none" and min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
                height, width = height // 2, width // 2
            previous = width_out
        self.features = nn.Sequential(*layers)

        head: list[nn.Module] = [nn.Flatten()]
        features = previous * height * width
        for width_out in hidden or []:
            head += [nn.Dropout(dropout)] if dropout > 0 else []
            head += [nn.Linear(features, width_out), nn.ReLU(inplace=True)]
            features = width_out
        head += [nn.Dropout(dropout)] if dropout > 0 else []
        head.append(nn.Linear(features, num_classes))  # logits: no ReLU
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)


def build(cfg: CNNConfig, info: DataInfo) -> CNN:
    return CNN(
        in_channels=info.in_channels,
        image_size=info.image_size,
        num_classes=info.num_classes,
        channels=list(cfg.channels),
        kernel_size=cfg.kernel_size,
        batch_norm=cfg.batch_norm,
        pool=cfg.pool,
        dropout=cfg.dropout,
        hidden=list(cfg.hidden),
    )
