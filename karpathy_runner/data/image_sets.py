"""Images as kdl holds them and prepares them: datasets in memory (one uint8 (N, C, H, W)
tensor, so a batch is a single indexing op) or in files (decoded a batch at a time, for a user's
folder that may not fit in memory), and `ImagePrep`, which scales, augments (random crop with
padding, flip) and normalises whole batches on the training device. Augmentation draws from a
generator seeded by (seed, step), so it does not depend on DataLoader workers or on where a run
resumed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import KdlError
from ..rng import mixed_seed
from .base import BatchDataset

# how many training images the mean/std of a dataset without published constants is computed from
STATS_SAMPLES = 1000


class TensorImages(BatchDataset):
    """Images and labels held in memory: uint8 (N, C, H, W) and int64 (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
        assert len(images) == len(labels)
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> TensorImages:
        return TensorImages(self.images.to(device), self.labels.to(device))

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select: the same rows as images[indices] at half its cost per call on the CPU
        # (but only with the indices where the images are)
        if indices.device != self.images.device:
            indices = indices.to(self.images.device)
        return self.images.index_select(0, indices), self.labels.index_select(0, indices)

    def subset(self, indices: torch.Tensor) -> TensorImages:
        return TensorImages(self.images[indices], self.labels[indices])


class FolderImages(BatchDataset):
    """Image files decoded per batch: RGB, uint8 (B, 3, size, size); resized to (size, size),
    or with `crop` (a pretrained model's preprocessing) resized so that the shorter side is
    `size`, then centre-cropped to (crop, crop)."""

    def __init__(self, paths: list[str], labels: torch.Tensor, image_size: int,
                 crop: int | None = None):
        assert len(paths) == len(labels)
        self.paths = paths
        self.labels = labels
        self.image_size = image_size
        self.crop = crop

    def __len__(self) -> int:
        return len(self.paths)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [self.paths[i] for i in indices.tolist()]
        try:
            images = read_images(paths, 3, self.image_size, self.crop)
        except OSError as exc:
            raise KdlError(
                f"image_folder: cannot read {exc}; replace or remove the file, or set "
                "data.skip_bad_files: true to leave out files that do not decode"
            ) from None
        return images, self.labels[indices]

    def to(self, device: torch.device) -> TensorImages:
        """Every image decoded once (data.placement: device), then kept on `device`."""
        images, labels = self.get_batch(torch.arange(len(self)))
        return TensorImages(images, labels).to(device)

    def subset(self, indices: torch.Tensor) -> FolderImages:
        paths = [self.paths[i] for i in indices.tolist()]
        return FolderImages(paths, self.labels[indices], self.image_size, self.crop)


def read_images(paths: list[str], channels: int, size: int, crop: int | None = None) -> torch.Tensor:
    """Image files as uint8 (B, channels, S, S): RGB or gray, resized to (size, size); with
    `crop`, the shorter side resized to `size`, then the centre (crop, crop) (S = crop)."""
    return torch.stack([_read(path, channels, size, crop) for path in paths])


def open_image(path: str) -> Any:
    """PIL's Image.open, with an image too large to decode safely (PIL's decompression-bomb
    limit: a warning beyond MAX_IMAGE_PIXELS, an error beyond twice that) an OSError like any
    file PIL cannot read, never a raw warning or another exception."""
    import warnings

    from PIL import Image  # only for image files: runs on in-memory datasets never need it

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise OSError(f"{exc} Resize it first") from None


def _read(path: str, channels: int, size: int, crop: int | None) -> torch.Tensor:
    from PIL import Image

    try:
        with open_image(path) as image:
            picture = image.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise OSError(f"{path} ({exc})") from None  # which file: a truncated one's error says not
    if crop is None:
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    else:
        scale = size / min(picture.size)
        width, height = max(crop, round(picture.width * scale)), max(crop, round(picture.height * scale))
        picture = picture.resize((width, height), Image.Resampling.BILINEAR)
        left, top = (width - crop) // 2, (height - crop) // 2
        picture = picture.crop((left, top, left + crop, top + crop))
    pixels = torch.from_numpy(np.asarray(picture).copy())
    return pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.unsqueeze(0)  # (C, H, W)


ImageDataset = TensorImages | FolderImages


class ImagePrep:
    """uint8 (B, C, H, W) -> float normalised per channel, on the device; augmented when a
    training step is given. The augmentation moves uint8 pixels (a quarter of the bytes of
    floats), then a single op scales and normalises them: x * (1 / (255 std)) - mean / std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: tuple[str, ...],
                 padding: int, seed: int, device: torch.device | None = None):
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.padding, self.seed = augment, padding, seed
        self.device = torch.device("cpu") if device is None else device
        shape = (1, len(mean), 1, 1)
        std64 = torch.tensor(std, dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std64)).float().view(shape).to(self.device)
        self.shift = (-torch.tensor(mean, dtype=torch.float64) / std64).float().view(shape).to(self.device)

    def to(self, device: torch.device) -> ImagePrep:
        return ImagePrep(self.mean, self.std, self.augment, self.padding, self.seed, device)

    def __call__(self, batch: tuple[torch.Tensor, ...], step: int | None) -> tuple[torch.Tensor, ...]:
        images, labels = batch
        if images.device != self.device:  # (streamed batches; resident ones are there already)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        if step is not None and self.augment:
            generator = torch.Generator(device=self.device).manual_seed(
                mixed_seed(self.seed, step + 1)
            )
            images = augment_batch(images, self.augment, self.padding, generator)
        return torch.addcmul(self.shift, images.float(), self.scale), labels


def augment_batch(
    x: torch.Tensor, augment: tuple[str, ...], padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with zero padding and/or horizontal flip, per sample, on the whole batch."""
    batch, _, height, width = x.shape
    if "crop" in augment and padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        shift = torch.randint(0, 2 * padding + 1, (2, batch), device=x.device, generator=generator)
        rows = torch.arange(height, device=x.device).unsqueeze(0) + shift[0].unsqueeze(1)  # (B, H)
        cols = torch.arange(width, device=x.device).unsqueeze(0) + shift[1].unsqueeze(1)  # (B, W)
        index = torch.arange(batch, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2).contiguous()
    if "flip" in augment:
        flip = torch.rand(batch, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x



def channel_stats(dataset: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, from the first STATS_SAMPLES images."""
    images, _ = dataset.get_batch(torch.arange(min(len(dataset), STATS_SAMPLES)))
    pixels = images.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    # a channel that never varies (gray images saved as RGB) must not divide by zero
    mean, std = pixels.mean(dim=1), pixels.std(dim=1).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


