"""Semantic segmentation data: images with masks of class indices, in Pascal VOC's layout (JPEG
images, palette PNG masks, ImageSets split lists) or a user's images/ + masks/ folder pair.

Every pair is decoded once, resized to one square size (the mask by nearest neighbour) and held
in memory as uint8 tensors, so that batches are cut and augmented on the training device:
`SegmentationPrep` applies the same random crop and flip to an image and its mask, drawn from a
generator seeded by (seed, step) as image classification's are. A mask value outside the classes
(other than the ignore index 255) is an error naming the file, found while reading, never a
wrong label trained on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config.data import SegmentationData, SegmentationDataConfig
from ..errors import KdlError
from ..rng import mixed_seed
from .base import BatchDataset, DataBundle, DataInfo, Preprocessing, download, split_off
from .image_sets import channel_stats, open_image
from .images import ImageInputs

IGNORE_INDEX = 255  # mask pixels that count for no class (VOC: object borders, "difficult" parts)
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MASK_MODES = ("P", "L")  # class indices: a palette PNG (VOC's) or 8-bit grey


def voc_palette() -> list[int]:
    """Pascal VOC's colour map, 256 RGB triples flattened (PIL's putpalette): class c's colour
    spreads the bits of c over the high bits of R, G and B; 255 (ignored) is (224, 224, 192)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    return palette


class TensorMasks(BatchDataset):
    """Images and masks held in memory: uint8 (N, 3, S, S) and uint8 (N, S, S)."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor):
        assert images.dtype == masks.dtype == torch.uint8 and len(images) == len(masks)
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.masks.nbytes

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> TensorMasks:
        return TensorMasks(self.images.to(device), self.masks.to(device))

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.images.device)
        return self.images.index_select(0, indices), self.masks.index_select(0, indices)

    def subset(self, indices: torch.Tensor) -> TensorMasks:
        return TensorMasks(self.images[indices], self.masks[indices])


# ----------------------------------------------------------------------------- reading pairs


def read_pairs(pairs: Sequence[tuple[Path, Path]], size: int, num_classes: int | None,
               fix: str) -> tuple[TensorMasks, int]:
    """Image and mask files decoded (threads: PIL decodes without the GIL), resized to (size,
    size), checked: every mask value is a class below `num_classes` (None: the largest found,
    plus one) or IGNORE_INDEX; else an error naming the file, ending with `fix`. Returns the
    pairs and the number of classes."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda pair: _read_pair(*pair, size), pairs))
    present = np.stack([found for _, _, found in decoded])  # (N, 256): values in each mask
    if num_classes is None:
        labels = np.flatnonzero(present[:, :IGNORE_INDEX].any(axis=0))
        num_classes = max(2, int(labels[-1]) + 1 if len(labels) else 0)
    outside = present[:, num_classes:IGNORE_INDEX].any(axis=1)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        values = num_classes + np.flatnonzero(present[first, num_classes:IGNORE_INDEX])
        raise KdlError(
            f"{pairs[first][1]}: the mask holds class {', '.join(map(str, values[:5].tolist()))}, "
            f"outside the {num_classes} classes (0 to {num_classes - 1}; {IGNORE_INDEX} marks "
            f"pixels to ignore). {fix}"
        )
    images = torch.from_numpy(np.stack([image for image, _, _ in decoded])).permute(0, 3, 1, 2)
    masks = torch.from_numpy(np.stack([mask for _, mask, _ in decoded]))
    return TensorMasks(images.contiguous(), masks), num_classes


def _read_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (S, S, 3), mask (S, S), which of the 256 values the mask holds)."""
    from PIL import Image

    image = _read_image(image_path)
    try:
        with open_image(str(mask_path)) as opened:
            opened.load()
            mask = opened
    except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise KdlError(f"{mask_path}: not a mask PIL can read ({exc}); replace or remove it") from None
    if mask.mode not in MASK_MODES:
        raise KdlError(
            f"{mask_path}: a mask must be a PNG of class indices, a palette image (mode P, as Pascal "
            f"VOC's) or 8-bit grey (mode L), with {IGNORE_INDEX} where no class counts; this one "
            f"is mode {mask.mode}. Save it with the class index as each pixel's value."
        )
    if mask.size != image.size:
        raise KdlError(f"{mask_path}: the mask is {mask.size[0]}x{mask.size[1]} pixels, its image "
                       f"{image_path} {image.size[0]}x{image.size[1]}; a mask labels its image's pixels")
    values = np.asarray(mask)
    found = np.bincount(values.ravel(), minlength=256) > 0
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    mask = mask.resize((size, size), Image.Resampling.NEAREST)  # indices, never blended
    return np.asarray(image).copy(), np.asarray(mask).copy(), found


def _read_image(path: Path) -> Any:
    try:
        with open_image(str(path)) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as exc:
        raise KdlError(f"{path}: not an image PIL can read ({exc}); replace or remove it") from None


def voc_pairs(folder: Path, split: str) -> list[tuple[Path, Path]]:
    """The (JPEGImages/<name>.jpg, SegmentationClass/<name>.png) pairs that
    ImageSets/Segmentation/<split>.txt lists."""
    listing = folder / "ImageSets" / "Segmentation" / f"{split}.txt"
    try:
        names = listing.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise KdlError(f"{listing}: cannot read the {split} list of the VOC folder {folder} "
                       f"({exc.strerror if isinstance(exc, OSError) else exc}); it lists one image name "
                       "per line") from None
    pairs = [(folder / "JPEGImages" / f"{name}.jpg", folder / "SegmentationClass" / f"{name}.png")
             for name in names]
    missing = [path for pair in pairs for path in pair if not path.is_file()]
    if missing or not pairs:
        raise KdlError(f"{listing} lists {len(pairs)} images, but "
                       + (f"{len(missing)} of their files are missing, e.g. {missing[0]}"
                          if missing else "a split needs at least one"))
    return pairs


def folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    """images/<name>.<ext> with masks/<name>.png, sorted by name; an image without its mask, or a
    mask without its image, is an error naming it."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for folder in (root / "images", root / "masks"):
        if not folder.is_dir():
            what = "missing" if not folder.exists() else "not a folder"
            raise KdlError(f"segmentation_folder: {folder} is {what}. "
                           f"Expected: {root}/images/<name>.jpg|png and {root}/masks/<name>.png, a mask "
                           "of class indices for every image (data.root)")
    images = {p.stem: p for p in (root / "images").iterdir() if p.suffix.lower() in IMG_EXTENSIONS}
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.suffix.lower() == ".png"}
    alone = sorted(set(images) ^ set(masks))
    if alone:
        example = images.get(alone[0]) or masks[alone[0]]
        raise KdlError(f"segmentation_folder: {len(alone)} file(s) in {root} without their pair, e.g. "
                       f"{example}; each images/<name> needs its mask masks/<name>.png, and each mask "
                       "its image")
    if not images:
        raise KdlError(f"segmentation_folder: no images in {root / 'images'} "
                       f"({', '.join(IMG_EXTENSIONS)})")
    return [(images[name], masks[name]) for name in sorted(images)]


# ----------------------------------------------------------------------------- the bundle


def build(cfg: SegmentationDataConfig, seed: int, vocabulary: list[str] | None,
          preprocessing: Preprocessing | None) -> DataBundle:
    if cfg.name == "voc":
        folder, names = _voc_folder(cfg), VOC_CLASSES
        fix = f"Pascal VOC's masks hold 0 to 20 and {IGNORE_INDEX}: is the file damaged?"
        train, _ = read_pairs(voc_pairs(folder, "train"), cfg.image_size, len(names), fix)
        val, _ = read_pairs(voc_pairs(folder, "val"), cfg.image_size, len(names), fix)
        return bundle(train, val, None, names, (IMAGENET_MEAN, IMAGENET_STD), cfg, seed, preprocessing)
    root = Path(cfg.root).expanduser().resolve()
    count = cfg.num_classes or (len(cfg.class_names) if cfg.class_names else None)
    fix = ("Fix the mask, or set data.num_classes (or data.class_names) to cover every class"
           if count else "")
    pairs, num_classes = read_pairs(folder_pairs(root), cfg.image_size, count, fix)
    names = cfg.class_names or [str(index) for index in range(num_classes)]
    train, val = pairs, None
    if cfg.val_fraction:
        kept, held = split_off(len(pairs), cfg.val_fraction, cfg.split_seed)
        train, val = pairs.subset(kept), pairs.subset(held)
    return bundle(train, val, None, names, channel_stats(train), cfg, seed, preprocessing)


def bundle(train: TensorMasks, val: TensorMasks | None, test: TensorMasks | None, names: list[str],
           stats: tuple[tuple[float, ...], tuple[float, ...]], cfg: SegmentationData, seed: int,
           preprocessing: Preprocessing | None) -> DataBundle:
    """The splits with their DataInfo, preparation and `kdl predict`'s inputs; a pretrained
    model's normalisation replaces the data's `stats` (mean, std)."""
    mean, std = (preprocessing.mean, preprocessing.std) if preprocessing else stats
    size = train.images.shape[-1]
    info = DataInfo(kind=cfg.kind(), num_classes=len(names), class_names=list(names), in_channels=3,
                    image_size=(size, size), mean=tuple(mean), std=tuple(std))
    prepare = SegmentationPrep(info.mean, info.std, tuple(cfg.augment), cfg.crop_padding, seed)
    return DataBundle(train=train, val=val, test=test, info=info, prepare=prepare,
                      inputs=MaskInputs(size))


def _voc_folder(cfg: SegmentationDataConfig) -> Path:
    """root/VOCdevkit/VOC<year>, downloaded by torchvision's VOCSegmentation when missing."""
    from torchvision.datasets import VOCSegmentation
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    root = Path(cfg.root).expanduser().resolve()
    folder = root / "VOCdevkit" / f"VOC{cfg.year}"
    expected = "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt"
    if (folder / "ImageSets" / "Segmentation").is_dir():
        return folder
    release = DATASET_YEAR_DICT[cfg.year]
    if not cfg.download:
        raise KdlError(f"Pascal VOC {cfg.year} not found: {folder} is missing or incomplete (it holds "
                       f"{expected}). Fix: set data.download: true (needs network), or unpack "
                       f"{release['filename']} into {root} (data.root).")
    download(f"voc {cfg.year}", release["url"], root, f"{folder} holds {expected}",
             lambda: VOCSegmentation(str(root), year=cfg.year, image_set="train", download=True))
    return folder


class MaskInputs:
    """`kdl predict`'s images (files, folders of them) as a batch: (images (B, 3, S, S) resized
    as in training, empty masks, each image's original (height, width))."""

    def __init__(self, size: int):
        self.size = size

    def items(self, given: list[str]) -> list[str]:
        for item in given:
            if not Path(item).expanduser().exists():
                raise KdlError(f"{item}: no such image file or folder; the run segments images: give "
                               "image files or folders of them")
        return ImageInputs(3, self.size, None).items(given)

    def batch(self, items: Sequence[str | Path]) -> tuple[torch.Tensor, ...]:
        from PIL import Image

        pictures = [_read_image(Path(item)) for item in items]
        sizes = torch.tensor([[picture.height, picture.width] for picture in pictures])
        resized = [np.asarray(p.resize((self.size, self.size), Image.Resampling.BILINEAR)) for p in pictures]
        images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()
        return images, torch.zeros(len(items), self.size, self.size, dtype=torch.uint8), sizes


# ----------------------------------------------------------------------------- on the device


class SegmentationPrep:
    """(uint8 images (B, 3, S, S), uint8 masks (B, S, S), ...) -> (normalised float images,
    int64 masks, ...) on the device, the pair augmented alike when a training step is given."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: tuple[str, ...],
                 padding: int, seed: int, device: torch.device | None = None):
        self.mean, self.std, self.augment, self.padding, self.seed = mean, std, augment, padding, seed
        self.device = torch.device("cpu") if device is None else device
        std64 = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        mean64 = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        # x * (1 / (255 std)) - mean / std, in one op
        self.scale = (1.0 / (255.0 * std64)).float().to(self.device)
        self.shift = (-mean64 / std64).float().to(self.device)

    def to(self, device: torch.device) -> SegmentationPrep:
        return SegmentationPrep(self.mean, self.std, self.augment, self.padding, self.seed, device)

    def __call__(self, batch: tuple[torch.Tensor, ...], step: int | None) -> tuple[torch.Tensor, ...]:
        images, masks, *rest = (t.to(self.device, non_blocking=True) for t in batch)
        if step is not None and self.augment:
            generator = torch.Generator(device=self.device).manual_seed(mixed_seed(self.seed, step + 1))
            images, masks = augment_pairs(images, masks, self.augment, self.padding, generator)
        return (torch.addcmul(self.shift, images.float(), self.scale), masks.long(), *rest)


def augment_pairs(images: torch.Tensor, masks: torch.Tensor, augment: tuple[str, ...], padding: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random crop (of the pair padded: black, and IGNORE_INDEX in the mask, so that
    padding is never a class) and horizontal flip for each image and its mask."""
    batch, _, height, width = images.shape
    if "crop" in augment and padding > 0:
        images = F.pad(images, (padding,) * 4)
        masks = F.pad(masks, (padding,) * 4, value=IGNORE_INDEX)
        shift = torch.randint(0, 2 * padding + 1, (2, batch), device=images.device, generator=generator)
        rows = (torch.arange(height, device=images.device) + shift[0, :, None])[:, :, None]  # (B, H, 1)
        cols = (torch.arange(width, device=images.device) + shift[1, :, None])[:, None, :]  # (B, 1, W)
        index = torch.arange(batch, device=images.device)[:, None, None]
        images = images.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2).contiguous()
        masks = masks[index, rows, cols]  # (B, H, W)
    if "flip" in augment:
        flip = torch.rand(batch, device=images.device, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        masks = torch.where(flip[:, None, None], masks.flip(2), masks)
    return images, masks
