"""Writers of tiny datasets in the exact real on-disk formats (no downloads in tests)."""

from __future__ import annotations

import csv
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def write_cifar10(root: Path, per_batch: int = 10) -> np.ndarray:
    """cifar-10-batches-py: pickled dicts of (N, 3072) uint8 rows, the R, then G, then B plane.

    The real files are Python 2 pickles whose str keys load as str under encoding="latin1",
    which is what torchvision reads, so the keys here are str too. Returns all train rows.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_rows = []
    for name, first in [(f"data_batch_{b}", (b - 1) * per_batch) for b in range(1, 6)] + [
        ("test_batch", 1000)
    ]:
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        rows[:, 0] = np.arange(first, first + per_batch) % 256  # red (0, 0) = image index
        labels = [(first + i) % 10 for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": labels}, f)
        if name != "test_batch":
            train_rows.append(rows)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_vis": 3072, "num_cases_per_batch": 10}, f)
    return np.concatenate(train_rows)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: big-endian magic (0x08 = uint8, then the number of dims), the dims, the raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, num_train: int = 30, num_test: int = 10) -> np.ndarray:
    rng = np.random.default_rng(1)
    raw = root / folder / "raw"
    train = rng.integers(0, 256, size=(num_train, 28, 28), dtype=np.uint8)
    train[:, 0, 0] = np.arange(num_train)
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(num_train) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((num_test, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(num_test) % 10)
    return train


RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_png(path: Path, color: tuple[int, int, int], size=(10, 6), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)


def write_folder(root: Path, split: str, per_class: int) -> None:
    for i in range(per_class):
        write_png(root / split / "cat" / f"{i}.png", RED)
        write_png(root / split / "dog" / f"{i}.png", BLUE, size=(5, 13))


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def voc_palette() -> list[int]:
    """Pascal VOC's colour map, computed here as its devkit does (bits of the class index spread
    over the high bits of R, G, B), independently of kdl's copy."""
    palette = []
    for index in range(256):
        rgb, value = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette += rgb
    return palette


def square_pair(index: int, size: int, num_classes: int) -> tuple[Image.Image, np.ndarray]:
    """An image and its mask of class indices: background 0 with a square of class
    1 + index % (num_classes - 1), coloured by its class (so that a model can learn it), and a
    one-pixel border of the ignore index 255 around the square, as VOC outlines its objects."""
    rng = np.random.default_rng(index)
    mask = np.zeros((size, size), dtype=np.uint8)
    side = max(3, size // 3)
    top, left = (int(v) for v in rng.integers(1, size - side - 1, 2))
    cls = 1 + index % (num_classes - 1)
    mask[top - 1:top + side + 1, left - 1:left + side + 1] = 255
    mask[top:top + side, left:left + side] = cls
    pixels = np.full((size, size, 3), 40, dtype=np.uint8)
    pixels[mask == cls] = [(cls * 80) % 256, 255 - (cls * 50) % 256, (cls * 120) % 256]
    return Image.fromarray(pixels), mask


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A palette PNG (mode P, VOC's colours) whose pixel values are the class indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("P", (mask.shape[1], mask.shape[0]))
    picture.putdata(mask.ravel().tolist())
    picture.putpalette(voc_palette())
    picture.save(path)


def write_voc(folder: Path, counts: dict[str, int], size: int = 20, num_classes: int = 21) -> Path:
    """A Pascal VOC folder (VOCdevkit/VOC2012 layout): JPEGImages/*.jpg, SegmentationClass/*.png
    palette masks, ImageSets/Segmentation/<split>.txt; images named like VOC's (2007_000032), the
    splits' names apart."""
    for number, (split, count) in enumerate(counts.items()):
        names = []
        for index in range(count):
            name = f"{2007 + number}_{index:06d}"
            names.append(name)
            image, mask = square_pair(1000 * number + index, size, num_classes)
            (folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
            image.save(folder / "JPEGImages" / f"{name}.jpg", quality=95)
            write_mask_png(folder / "SegmentationClass" / f"{name}.png", mask)
        listing = folder / "ImageSets" / "Segmentation" / f"{split}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{name}\n" for name in names))
    return folder


def write_mask_folder(root: Path, count: int, size: int = 20, num_classes: int = 3) -> Path:
    """A plain images/ + masks/ folder pair: PNG images and grey (mode L) masks of class indices."""
    for index in range(count):
        image, mask = square_pair(index, size, num_classes)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / f"img{index:03d}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{index:03d}.png")
    return root
