"""DCGAN (Radford et al.; pytorch/examples' dcgan): a generator of transposed convolutions from
a latent vector z up to the image, and a discriminator of strided convolutions down to one
logit, both sized from the data's image shape.

A square image of side s0 * 2**k (4 <= s0 <= 7, k >= 1: 8, 12, 16, 28, 32, 64, ...) is built
as: z -> s0 x s0 (width * 2**(k-1) maps) -> k doublings, halving the maps, -> the image (tanh);
the discriminator mirrors it. Weights start from N(0, 0.02), batch-norm scales from N(1, 0.02).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..config.models import GANModelConfig
from ..data import DataInfo
from ..errors import KdlError
from . import Model


def start_size(side: int) -> tuple[int, int]:
    """(s0, k) with side == s0 * 2**k, 4 <= s0 <= 7, k >= 1; ValueError if there is none."""
    s0, k = side, 0
    while s0 % 2 == 0 and s0 // 2 >= 4:
        s0, k = s0 // 2, k + 1
    if not 4 <= s0 <= 7 or k == 0:
        raise ValueError(side)
    return s0, k


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(Model):
    """z (B, nz) -> images (B, C, side, side): in [-1, 1] through a tanh, or the last layer's
    values as they are with `tanh=False` (a VAE's decoder)."""

    def __init__(self, latent_size: int, channels: int, side: int, width: int, batch_norm: bool = True,
                 tanh: bool = True):
        super().__init__()
        s0, k = start_size(side)
        maps = [width * 2 ** (k - 1 - i) for i in range(k)]  # per block, halving toward the image

        def block(conv: nn.Module, out: int) -> list[nn.Module]:
            return [conv, *([nn.BatchNorm2d(out)] if batch_norm else []), nn.ReLU(True)]

        layers = block(nn.ConvTranspose2d(latent_size, maps[0], s0, 1, 0, bias=not batch_norm), maps[0])
        for previous, out in zip(maps, maps[1:], strict=False):  # each doubles the side
            layers += block(nn.ConvTranspose2d(previous, out, 4, 2, 1, bias=not batch_norm), out)
        layers += [nn.ConvTranspose2d(maps[-1], channels, 4, 2, 1), *([nn.Tanh()] if tanh else [])]
        self.net = nn.Sequential(*layers)
        self.latent_size = latent_size
        self.apply(_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))  # (B, nz) -> (B, C, side, side) in [-1, 1]


class Discriminator(Model):
    """images (B, C, side, side) -> one logit each (B,), or `outputs` values each (B, outputs)
    (a VAE's encoder: the mean and log-variance of z)."""

    def __init__(self, channels: int, side: int, width: int, batch_norm: bool = True,
                 spectral: bool = False, outputs: int = 1):
        super().__init__()
        s0, k = start_size(side)
        maps = [width * 2 ** i for i in range(k)]  # per block, doubling away from the image
        norm = batch_norm and not spectral  # spectral norm replaces batch norm

        layers: list[nn.Module] = [nn.Conv2d(channels, maps[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for previous, out in zip(maps, maps[1:], strict=False):  # each halves the side
            layers += [nn.Conv2d(previous, out, 4, 2, 1, bias=not norm),
                       *([nn.BatchNorm2d(out)] if norm else []), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(maps[-1], outputs, s0, 1, 0))  # s0 x s0 -> one logit (or outputs)
        self.net = nn.Sequential(*layers)
        self.apply(_init)
        if spectral:
            for i, layer in enumerate(self.net):
                if isinstance(layer, nn.Conv2d):
                    self.net[i] = spectral_norm(layer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(1).squeeze(1)  # (B,) logits, or (B, outputs)


class DCGAN(Model):
    def __init__(self, generator: Generator, discriminator: Discriminator):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator


def side_of(info: DataInfo, model: str) -> int:
    """The side of the data's images, which must be one DCGAN's sizing builds (`model`: how the
    error names the model)."""
    height, width = info.image_size
    try:
        if height != width:
            raise ValueError(height)
        start_size(height)
    except ValueError:
        raise KdlError(
            f"model.name: {model} cannot build {height}x{width} images: it makes square images "
            "whose side is 4 to 7 times a power of two, at least 8 (8, 12, 16, 28, 32, 64, ...). "
            "For data.name: image_folder set data.image_size to 32 or 64."
        ) from None
    return height


def build(cfg: GANModelConfig, info: DataInfo) -> DCGAN:
    height = side_of(info, "gan (DCGAN)")
    return DCGAN(
        Generator(cfg.latent_size, info.in_channels, height, cfg.width, cfg.batch_norm),
        Discriminator(info.in_channels, height, cfg.width, cfg.batch_norm, cfg.spectral_norm),
    )
