"""Image classification data: torchvision datasets, scikit-learn digits and a user's folder,
read into the datasets of image_sets.py (in memory, or files decoded per batch)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.data import ImageDataConfig
from ..errors import KdlError
from ..runfolder.fsio import atomic_write
from .base import DataBundle, DataInfo, Preprocessing, split_off
from .image_sets import (
    FolderImages,
    ImageDataset,
    ImagePrep,
    TensorImages,
    channel_stats,
    open_image,
    read_images,
)

DIGITS_TEST_FRACTION = 0.2


def build(cfg: ImageDataConfig, seed: int, vocabulary: list[str] | None,
          preprocessing: Preprocessing | None) -> DataBundle:
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
    info.kind = cfg.kind()
    # new images are read at the size the training images had: an image folder's own (and a
    # pretrained model's crop), else the dataset's
    size, crop = ((train.image_size, train.crop) if isinstance(train, FolderImages)
                  else (info.image_size[0], None))
    return DataBundle(train=train, val=val, test=test, info=info, prepare=prepare,
                      inputs=ImageInputs(info.in_channels, size, crop), placement=cfg.placement)


class ImageInputs:
    """`kdl predict`'s images: files, and the images inside folders (recursively, sorted), read
    as the training images were."""

    def __init__(self, channels: int, size: int, crop: int | None):
        self.channels, self.size, self.crop = channels, size, crop

    def items(self, given: list[str]) -> list[str]:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        paths: list[str] = []
        for item in given:
            path = Path(item).expanduser()
            if path.is_dir():
                found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
                if not found:
                    raise KdlError(f"{item}: the folder holds no images ({', '.join(IMG_EXTENSIONS)})")
                paths += found
            elif path.is_file():
                paths.append(str(path))
            else:
                raise KdlError(f"{item}: no such image file or folder; the run classifies images: "
                               "give image files or folders of them")
        return paths

    def batch(self, items: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            images = read_images(items, self.channels, self.size, self.crop)
        except OSError as exc:  # PIL: not an image, or a damaged one
            raise KdlError(f"cannot read an image among {', '.join(items)}: {exc}") from None
        return images, torch.zeros(len(items), dtype=torch.int64)


Splits = tuple[ImageDataset, ImageDataset | None, ImageDataset | None, DataInfo]


def _train_val(
    train: ImageDataset, cfg: ImageDataConfig
) -> tuple[ImageDataset, ImageDataset | None]:
    if cfg.val_fraction == 0:
        return train, None
    kept, held = split_off(len(train), cfg.val_fraction, cfg.split_seed)
    return train.subset(kept), train.subset(held)


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
    train = _scan(root / "train", class_to_idx, cfg, size, crop, allow_empty=True)
    found = set(train.labels.tolist())
    empty = [name for name in classes if class_to_idx[name] not in found]
    if empty:
        raise KdlError(
            f"image_folder: class folders of {root / 'train'} without images: "
            f"{', '.join(empty[:20])}{' ...' if len(empty) > 20 else ''} ({len(empty)} of "
            f"{len(classes)}); image types read: {', '.join(IMG_EXTENSIONS)}. Add images to them "
            "or remove them."
        )
    if len(classes) < 2:
        raise KdlError(
            f"image_folder: {root / 'train'} has one class folder ({classes[0]}): a classifier "
            f"needs two or more, one folder per class. Expected: {_FOLDER_LAYOUT}."
        )
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
    """Why PIL cannot identify the image file or would not decode it (its header only: fast),
    or None."""
    try:
        with open_image(path):
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
