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
