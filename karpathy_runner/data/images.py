"""Image classification data: torchvision datasets, scikit-learn digits and a user's folder.

Small datasets live in memory as one uint8 (N, C, H, W) tensor, so a batch is a single indexing
op. A user's folder may not fit in memory, so it keeps file paths and decodes a batch when asked
for it. Scaling, augmentation (random crop with padding, flip) and normalisation happen in
`ImagePrep`, on the training device, on whole batches; augmentation draws from a generator seeded
by (seed, step), so it does not depend on DataLoader workers or on where a run resumed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ImageDataConfig
from ..errors import KdlError
from ..runs import atomic_write
from . import DataBundle, DataInfo, Preprocessing, mixed_seed

# how many training images the mean/std of a dataset without published constants is computed from
STATS_SAMPLES = 1000
DIGITS_TEST_FRACTION = 0.2


class TensorImages:
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


class FolderImages:
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


def _read(path: str, channels: int, size: int, crop: int | None) -> torch.Tensor:
    from PIL import Image  # only for image files: runs on in-memory datasets never need it

    try:
        with Image.open(path) as image:
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


def build(cfg: ImageDataConfig, seed: int, vocabulary: list[str] | None = None,
          preprocessing: Preprocessing | None = None) -> DataBundle:
    """Build train/val/test for `cfg.name`; val is `cfg.val_fraction` of the train split.
    With `as_sequence: rows` the data is the same; the kind tells the model to read rows.
    A pretrained model's `preprocessing` replaces the data's normalisation, and for an image
    folder its size (resize and centre crop)."""
    if cfg.name == "digits":
        train, val, test, info = _build_digits(cfg)
    elif cfg.name == "image_folder":
        train, val, test, info = _build_folder(cfg, preprocessing)
    else:
        train, val, test, info = _build_torchvision(cfg)
    if preprocessing is not None:
        info.mean, info.std = preprocessing.mean, preprocessing.std
    prepare = ImagePrep(info.mean, info.std, tuple(cfg.augment), cfg.crop_padding, seed)
    info.kind = ImageDataConfig.kind_of(cfg.model_dump())
    return DataBundle(train=train, val=val, test=test, info=info, prepare=prepare,
                      placement=cfg.placement)


Splits = tuple[ImageDataset, ImageDataset | None, ImageDataset | None, DataInfo]


def split_off(num_items: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) with `fraction` held out at random; a pure function of the seed."""
    if fraction == 0:
        return torch.arange(num_items), torch.arange(0)
    # at least one held-out item, so that a tiny dataset never gets an empty val split
    num_held = max(1, round(num_items * fraction))
    if num_held >= num_items:
        raise KdlError(
            f"cannot hold out {fraction:.0%} of {num_items} samples and keep any for training; "
            "lower data.val_fraction or add images"
        )
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    # sorted, so a split reads the source in order (faster for files, same result)
    return order[num_held:].sort().values, order[:num_held].sort().values


def _train_val(
    train: ImageDataset, cfg: ImageDataConfig
) -> tuple[ImageDataset, ImageDataset | None]:
    if cfg.val_fraction == 0:
        return train, None
    kept, held = split_off(len(train), cfg.val_fraction, cfg.split_seed)
    return train.subset(kept), train.subset(held)


def channel_stats(dataset: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, from the first STATS_SAMPLES images."""
    images, _ = dataset.get_batch(torch.arange(min(len(dataset), STATS_SAMPLES)))
    pixels = images.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    # a channel that never varies (gray images saved as RGB) must not divide by zero
    mean, std = pixels.mean(dim=1), pixels.std(dim=1).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _root(cfg: ImageDataConfig) -> Path:
    return Path(cfg.root).expanduser().resolve()


# ----------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class _Published:
    """A torchvision dataset: where it keeps its files, and its published normalisation."""

    torchvision_class: str
    folder: str  # under data.root
    files: str  # what torchvision expects in `folder`, for the error message
    mean: tuple[float, ...]
    std: tuple[float, ...]


_IDX_FILES = (
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte"
)
PUBLISHED: dict[str, _Published] = {
    "cifar10": _Published(
        "CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _Published(
        "CIFAR100", "cifar-100-python", "train, test, meta",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
    "mnist": _Published("MNIST", "MNIST/raw", _IDX_FILES, (0.1307,), (0.3081,)),
    "fashion_mnist": _Published(
        "FashionMNIST", "FashionMNIST/raw", _IDX_FILES, (0.2860,), (0.3530,)
    ),
}


def _build_torchvision(cfg: ImageDataConfig) -> Splits:
    spec = PUBLISHED[cfg.name]
    train, test, classes = _decoded(cfg, spec)
    train, val = _train_val(train, cfg)
    channels, height, width = train.images.shape[1:]
    info = DataInfo(
        kind=ImageDataConfig.KIND,
        num_classes=len(classes),
        class_names=list(classes),
        in_channels=channels,
        image_size=(height, width),
        mean=spec.mean,
        std=spec.std,
    )
    return train, val, test, info


# ----------------------------------------------------------------------------- dataset cache

CACHE_FOLDER = "kdl_cache"  # under data.root
CACHE_FORMAT = 1  # bump when what a cache file holds changes


def _decoded(cfg: ImageDataConfig, spec: _Published) -> tuple[TensorImages, TensorImages, list[str]]:
    """Train and test split as uint8 tensors. Decoding the published files (unpickling CIFAR,
    parsing IDX) through torchvision takes seconds, so the result is kept in one tensor file
    under data.root, valid while the source files keep the sizes and SHA-256 sums it records."""
    root = _root(cfg)
    path = root / CACHE_FOLDER / f"{cfg.name}.pt"
    cached = _read_cache(path, _sources(root / spec.folder))
    if cached is not None:
        return cached
    train, classes = _load_split(cfg, spec, train=True)
    test, _ = _load_split(cfg, spec, train=False)
    _write_cache(path, train, test, classes, _sources(root / spec.folder))
    return train, test, classes


def _sources(folder: Path) -> dict[str, list[Any]]:
    """Name -> [size, sha256] of every file torchvision reads the dataset from."""
    if not folder.is_dir():
        return {}
    sources = {}
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        with open(file, "rb") as handle:
            sources[file.name] = [file.stat().st_size, hashlib.file_digest(handle, "sha256").hexdigest()]
    return sources


def _read_cache(path: Path, sources: dict[str, list[Any]]
                ) -> tuple[TensorImages, TensorImages, list[str]] | None:
    """The cached splits, or None when there is no cache, it is damaged or its sources changed."""
    if not sources or not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True, mmap=True)
        if cached["format"] != CACHE_FORMAT or cached["sources"] != sources:
            return None
        return (TensorImages(cached["train_images"], cached["train_labels"]),
                TensorImages(cached["test_images"], cached["test_labels"]), cached["classes"])
    except Exception:  # any damage (a cut file, a foreign file): decode the sources again
        return None


def _write_cache(path: Path, train: TensorImages, test: TensorImages, classes: list[str],
                 sources: dict[str, list[Any]]) -> None:
    """Best effort: a read-only data.root just means decoding again next time."""
    cache = {"format": CACHE_FORMAT, "sources": sources, "classes": list(classes),
             "train_images": train.images, "train_labels": train.labels,
             "test_images": test.images, "test_labels": test.labels}
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda handle: torch.save(cache, handle))
    except OSError:
        pass


def _load_split(
    cfg: ImageDataConfig, spec: _Published, train: bool
) -> tuple[TensorImages, list[str]]:
    root = _root(cfg)
    import torchvision.datasets  # only here: importing torchvision costs seconds

    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        dataset = dataset_class(root=str(root), train=train, download=cfg.download)
    # torchvision reports missing files and failed downloads as RuntimeError or URLError (OSError)
    except (RuntimeError, OSError) as exc:
        raise KdlError(_unavailable_message(cfg, spec, dataset_class, root, exc)) from exc
    images = torch.as_tensor(dataset.data)
    # MNIST-like data is (N, H, W); CIFAR is (N, H, W, C) in numpy
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return TensorImages(images.contiguous(), labels), dataset.classes


def _unavailable_message(
    cfg: ImageDataConfig, spec: _Published, dataset_class: type, root: Path, exc: Exception
) -> str:
    folder = root / spec.folder
    top = spec.folder.split("/")[0]
    if not cfg.download:
        return (
            f"dataset {cfg.name!r} not found: {folder} is missing or incomplete (torchvision "
            f"expects {spec.files} there, unmodified). Fix: set data.download: true (needs "
            f"network), or put the {top} folder under {root} (data.root)."
        )
    url = getattr(dataset_class, "url", None) or dataset_class.mirrors[0]
    reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (
        f"could not download dataset {cfg.name!r} from {url} into {root}: {reason}. Fix: check "
        f"the network connection or proxy, or fetch the files on another machine and copy them "
        f"so that {folder} holds {spec.files}, then set data.download: false."
    )


# ----------------------------------------------------------------------------- digits


def _build_digits(cfg: ImageDataConfig) -> Splits:
    pixels, targets = _digits_arrays()
    values = torch.as_tensor(pixels, dtype=torch.float64).view(-1, 8, 8)  # (N, 8, 8), 0..16
    images = (values * 255 / 16).round().to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
    full = TensorImages(images, torch.as_tensor(targets, dtype=torch.int64))
    # digits has no official test split, so a fixed share of it plays that role
    kept, held = split_off(len(full), DIGITS_TEST_FRACTION, cfg.split_seed)
    train, val = _train_val(full.subset(kept), cfg)
    mean, std = channel_stats(train)
    info = DataInfo(
        kind=ImageDataConfig.KIND,
        num_classes=10,
        class_names=[str(digit) for digit in range(10)],
        in_channels=1,
        image_size=(8, 8),
        mean=mean,
        std=std,
    )
    return train, val, full.subset(held), info


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits file, read as load_digits reads it (no download).

    Reading the file directly skips importing scikit-learn and SciPy (about 2 s per process).
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data, digits.target
    table = np.loadtxt(path, delimiter=",")  # 64 pixel columns, then the digit
    return table[:, :-1], table[:, -1].astype(np.int64)


# ----------------------------------------------------------------------------- image folder

_FOLDER_LAYOUT = (
    "ROOT/train/<class>/<image> with one folder per class, plus optionally ROOT/val/<class>/... "
    "and ROOT/test/<class>/... with the same class names"
)


def _build_folder(cfg: ImageDataConfig, preprocessing: Preprocessing | None = None) -> Splits:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    root = _root(cfg)
    # (size, crop): the images' side, or a pretrained model's resize and centre crop
    size, crop = (preprocessing.resize, preprocessing.crop) if preprocessing else (cfg.image_size, None)
    if not (root / "train").is_dir():
        what = "does not exist" if not root.is_dir() else "has no train/ folder"
        raise KdlError(
            f"image_folder: {root} (data.root) {what}. Expected layout: {_FOLDER_LAYOUT}. "
            f"Supported image types: {', '.join(IMG_EXTENSIONS)}."
        )
    try:
        classes, class_to_idx = find_classes(root / "train")
    except FileNotFoundError:
        raise KdlError(
            f"image_folder: {root / 'train'} has no class folders. Expected: {_FOLDER_LAYOUT}."
        ) from None
    try:
        train = _scan(root / "train", class_to_idx, cfg, size, crop, allow_empty=False)
    except FileNotFoundError:  # torchvision's words for class folders without one image
        raise KdlError(
            f"image_folder: no images in the class folders of {root / 'train'} "
            f"({', '.join(classes)}); image types read: {', '.join(IMG_EXTENSIONS)}. "
            f"Expected: {_FOLDER_LAYOUT}."
        ) from None
    if (root / "val").is_dir():
        val = _scan_held(root / "val", class_to_idx, cfg, size, crop)
    else:
        train, val = _train_val(train, cfg)
    test = None
    if (root / "test").is_dir():
        test = _scan_held(root / "test", class_to_idx, cfg, size, crop)
    mean, std = channel_stats(train)
    info = DataInfo(
        kind=ImageDataConfig.KIND,
        num_classes=len(classes),
        class_names=classes,
        in_channels=3,
        image_size=(crop or size, crop or size),
        mean=mean,
        std=std,
    )
    return train, val, test, info


def _scan(
    folder: Path, class_to_idx: dict[str, int], cfg: ImageDataConfig, image_size: int,
    crop: int | None, allow_empty: bool
) -> FolderImages:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
    bad = [(path, problem) for path, _ in samples if (problem := _unreadable(path))]
    if bad and not cfg.skip_bad_files:
        path, problem = bad[0]
        raise KdlError(
            f"image_folder: {len(bad)} file(s) in {folder} are not images PIL can read, e.g. "
            f"{path} ({problem}). Replace or remove them, or set data.skip_bad_files: true to "
            "leave them out."
        )
    if bad:
        print(f"image_folder: left out {len(bad)} unreadable file(s) in {folder} "
              f"(data.skip_bad_files), e.g. {bad[0][0]}", file=sys.stderr, flush=True)
        samples = [sample for sample in samples if sample[0] not in dict(bad)]
    if not samples:
        raise KdlError(f"image_folder: no images in {folder}. Expected: {_FOLDER_LAYOUT}.")
    paths = [path for path, _ in samples]
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return FolderImages(paths, labels, image_size, crop)


def _unreadable(path: str) -> str | None:
    """Why PIL cannot identify the image file (its header only: fast), or None."""
    from PIL import Image

    try:
        with Image.open(path):
            return None
    except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        return str(exc) or type(exc).__name__


def _scan_held(folder: Path, class_to_idx: dict[str, int], cfg: ImageDataConfig, image_size: int,
               crop: int | None) -> FolderImages:
    """val/ or test/: may lack some classes, but a class unknown to train/ could never be right."""
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in class_to_idx)
    if unknown:
        raise KdlError(
            f"image_folder: {folder} has class folders that train/ lacks: {', '.join(unknown)}. "
            f"Train classes: {', '.join(class_to_idx)}. Rename or remove them."
        )
    return _scan(folder, class_to_idx, cfg, image_size, crop, allow_empty=True)
