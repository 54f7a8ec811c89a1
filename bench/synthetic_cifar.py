"""Synthetic CIFAR-10 in the real cifar-10-batches-py format, for benchmarks on machines that
cannot download the real data: each class is a blocky colour pattern plus as much noise, so a
network learns it, but accuracy on it means nothing; throughput and code paths do.

`use_synthetic_cifar(root)` writes the files once and lets torchvision read them (its md5
check of the published files is skipped in this process only).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
PER_BATCH = 10_000  # images per file: five training files and one test file, as published


def write_cifar10(root: Path, per_batch: int = PER_BATCH, seed: int = 0) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(10, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=per_batch)
        noise = rng.integers(0, 256, size=(per_batch, 3, 32, 32))
        images = ((patterns[labels] + noise) // 2).astype(np.uint8)  # (N, 3, 32, 32)
        batch = {"batch_label": name, "data": images.reshape(per_batch, 3072),
                 "labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": NAMES, "num_vis": 3072, "num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def use_synthetic_cifar(root: Path, per_batch: int = PER_BATCH) -> Path:
    """Write the files under `root` unless they are there with `per_batch` images per file
    (the benches share one root: another bench's size is written over); accept them in
    torchvision."""
    import torchvision.datasets.cifar as cifar

    meta = root / "cifar-10-batches-py" / "batches.meta"
    if not meta.is_file() or pickle.loads(meta.read_bytes())["num_cases_per_batch"] != per_batch:
        write_cifar10(root, per_batch)
    cifar.CIFAR10._check_integrity = lambda self: True
    cifar.check_integrity = lambda *args, **kwargs: True
    return root
