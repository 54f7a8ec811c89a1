"""A convolutional VAE (Kingma and Welling; pytorch/examples' vae, made convolutional), sized
like DCGAN from the data's image shape (models/gan.py's rules: a square image of side
s0 * 2**k, 4 <= s0 <= 7, k >= 1).

The encoder is DCGAN's discriminator with 2 * latent_size outputs: k strided 4x4 convolutions
halve the side down to s0 x s0, and an s0 x s0 convolution gives the mean and the log-variance
of z. The decoder is DCGAN's generator without its tanh: z up to the image, giving each pixel's
Bernoulli logit, or its Gaussian mean (with one learned log standard deviation per channel,
`log_scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.models import VAEModelConfig
from ..data import DataInfo
from . import Model
from .gan import Discriminator, Generator, side_of


class VAE(Model):
    def __init__(self, channels: int, side: int, cfg: VAEModelConfig):
        super().__init__()
        self.encoder = Discriminator(channels, side, cfg.width, cfg.batch_norm, outputs=2 * cfg.latent_size)
        self.decoder = Generator(cfg.latent_size, channels, side, cfg.width, cfg.batch_norm, tanh=False)
        self.latent_size = cfg.latent_size
        self.likelihood = cfg.decoder
        if cfg.decoder == "gaussian":  # log standard deviation of every pixel of a channel
            self.log_scale = nn.Parameter(torch.zeros(channels))

    def forward(self, images: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole pass, one forward (as data-parallel training needs): images (B, C, H, W)
        in [0, 1] -> (mu, logvar) of q(z | x), and the decoder's output for z = mu + sigma *
        noise (B, nz), the reparameterisation trick."""
        mu, logvar = self.encode(images)
        return mu, logvar, self.decoder(mu + torch.exp(0.5 * logvar) * noise)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder alone: images (B, C, H, W) in [0, 1] -> (mu, logvar) of q(z | x)."""
        mu, logvar = self.encoder(images * 2 - 1).chunk(2, dim=1)  # (B, nz) each
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, nz) -> the decoder's output (B, C, H, W): logits, or Gaussian means."""
        return self.decoder(z)

    def mean_image(self, output: torch.Tensor) -> torch.Tensor:
        """The decoder's output -> the expected image in [0, 1]."""
        return torch.sigmoid(output) if self.likelihood == "bernoulli" else output.clamp(0, 1)


def build(cfg: VAEModelConfig, info: DataInfo) -> VAE:
    return VAE(info.in_channels, side_of(info, "vae (sized as DCGAN)"), cfg)
