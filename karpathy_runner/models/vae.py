"""A convolutional VAE (Kingma and Welling; pytorch/examples' vae, made convolutional), sized
like DCGAN from the data's image shape (models/gan.py's rules: a square image of side
s0 * 2**k, 4 <= s0 <= 7, k >= 1).

The encoder mirrors DCGAN's discriminator: k strided 4x4 convolutions halve the side down to
s0 x s0, and an s0 x s0 convolution gives the mean and the log-variance of z (2 * latent_size
outputs). The decoder is DCGAN's generator without its tanh: z up to the image, giving each
pixel's Bernoulli logit, or its Gaussian mean (with one learned log standard deviation per
channel, `log_scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.models import VAEModelConfig
from ..data import DataInfo
from ..errors import KdlError
from . import Model
from .gan import init_weights, start_size


class Encoder(nn.Module):
    def __init__(self, channels: int, side: int, width: int, latent_size: int, batch_norm: bool):
        super().__init__()
        s0, k = start_size(side)
        maps = [width * 2 ** i for i in range(k)]  # per block, doubling away from the image
        layers: list[nn.Module] = [nn.Conv2d(channels, maps[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for previous, out in zip(maps, maps[1:], strict=False):  # each halves the side
            layers += [nn.Conv2d(previous, out, 4, 2, 1, bias=not batch_norm),
                       *([nn.BatchNorm2d(out)] if batch_norm else []), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(maps[-1], 2 * latent_size, s0, 1, 0))  # s0 x s0 -> (mu, logvar)
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(images).flatten(1).chunk(2, dim=1)  # (B, nz) each
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, latent_size: int, channels: int, side: int, width: int, batch_norm: bool):
        super().__init__()
        s0, k = start_size(side)
        maps = [width * 2 ** (k - 1 - i) for i in range(k)]  # per block, halving toward the image

        def block(conv: nn.Module, out: int) -> list[nn.Module]:
            return [conv, *([nn.BatchNorm2d(out)] if batch_norm else []), nn.ReLU(True)]

        layers = block(nn.ConvTranspose2d(latent_size, maps[0], s0, 1, 0, bias=not batch_norm), maps[0])
        for previous, out in zip(maps, maps[1:], strict=False):  # each doubles the side
            layers += block(nn.ConvTranspose2d(previous, out, 4, 2, 1, bias=not batch_norm), out)
        layers.append(nn.ConvTranspose2d(maps[-1], channels, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))  # (B, nz) -> (B, C, side, side)


class VAE(Model):
    def __init__(self, channels: int, side: int, cfg: VAEModelConfig):
        super().__init__()
        self.encoder = Encoder(channels, side, cfg.width, cfg.latent_size, cfg.batch_norm)
        self.decoder = Decoder(cfg.latent_size, channels, side, cfg.width, cfg.batch_norm)
        self.latent_size = cfg.latent_size
        self.likelihood = cfg.decoder
        self.apply(init_weights)
        if cfg.decoder == "gaussian":  # log standard deviation of every pixel of a channel
            self.log_scale = nn.Parameter(torch.zeros(channels))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder alone: images (B, C, H, W) in [0, 1] -> (mu, logvar) of q(z | x)."""
        return self.encoder(images * 2 - 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, nz) -> the decoder's output (B, C, H, W): logits, or Gaussian means."""
        return self.decoder(z)

    def mean_image(self, output: torch.Tensor) -> torch.Tensor:
        """The decoder's output -> the expected image in [0, 1]."""
        return torch.sigmoid(output) if self.likelihood == "bernoulli" else output.clamp(0, 1)


def build(cfg: VAEModelConfig, info: DataInfo) -> VAE:
    height, width = info.image_size
    try:
        if height != width:
            raise ValueError(height)
        start_size(height)
    except ValueError:
        raise KdlError(
            f"model.name: vae cannot build {height}x{width} images: like DCGAN it makes square "
            "images whose side is 4 to 7 times a power of two, at least 8 (8, 12, 16, 28, 32, 64, "
            "...). For data.name: image_folder set data.image_size to 32 or 64."
        ) from None
    return VAE(info.in_channels, height, cfg)
