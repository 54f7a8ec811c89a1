"""What the tasks that draw images from noise share (GAN, VAE): drawing many images a batch at a
time, at most as many as one grid holds, bytes of images from [0, 1], and the module `kdl
export` writes of a generator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import KdlError
from ..ui.pictures import GRID_PIXELS, grid_capacity, grid_shape

SAMPLE_BATCH = 1024  # images `kdl sample` draws at a time


def in_batches(noise: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """draw(noise) SAMPLE_BATCH at a time (the activations of a whole large grid at once would
    not fit in memory), concatenated."""
    return torch.cat([draw(part) for part in noise.split(SAMPLE_BATCH)])


def check_grid(n: int, image_size: tuple[int, int]) -> None:
    """Refuse `-n n` where one grid of n images would be more than GRID_PIXELS."""
    height, width = image_size
    most = grid_capacity(height, width)
    if n > most:
        rows, columns = grid_shape(n, height, width)
        raise KdlError(
            f"-n {n}: a grid of {n:,} images of {height}x{width} would be {columns:,}x{rows:,} "
            f"pixels, more than an image viewer opens safely ({GRID_PIXELS:,} pixels); one grid "
            f"holds at most {most:,} of them. Draw fewer, or several grids with other --seed values.")


def to_bytes(images: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] -> uint8 (0-255), rounded."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


class InUnitRange(torch.nn.Module):
    """A generator's network and the map of its output to images in [0, 1] (`kdl export`)."""

    def __init__(self, network: torch.nn.Module, to_unit: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.network, self.to_unit = network, to_unit

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_unit(self.network(z).float())
