"""Image data: each dataset is read from files the test writes in the real on-disk formats."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from datafiles import (  # noqa: F401
    BLUE,
    CIFAR10_NAMES,
    RED,
    write_cifar10,
    write_folder,
    write_idx,
    write_mnist,
    write_png,
)

from karpathy_runner.config.data import ImageDataConfig
from karpathy_runner.data import build_data
from karpathy_runner.errors import KdlError


def data_config(name: str, root: Path | str, **overrides) -> ImageDataConfig:
    return ImageDataConfig(name=name, root=str(root), download=False, **overrides)


def ids(images: torch.Tensor) -> list[int]:
    """The writers stamp each training image's index into its first byte."""
    return images[:, 0, 0, 0].tolist()


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_reads_real_batch_files(tmp_path, skip_md5):
    rows = write_cifar10(tmp_path)
    bundle = build_data(data_config("cifar10", tmp_path, val_fraction=0.0))

    assert bundle.val is None
    assert len(bundle.train) == 50 and len(bundle.test) == 10
    assert bundle.train.images.shape == (50, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
    # row layout: 1024 red, then green, then blue values, each plane row-major
    image, channel, y, x = 13, 2, 5, 7
    assert bundle.train.images[image, channel, y, x] == rows[image, channel * 1024 + y * 32 + x]
    assert torch.equal(bundle.train.images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))

    images, labels = bundle.train.get_batch(torch.tensor([3, 17]))
    assert images.shape == (2, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.tolist() == [3, 7]
    assert ids(images) == [3, 17]

    info = bundle.info
    assert info.kind == "image" and info.num_classes == 10 and info.class_names == CIFAR10_NAMES
    assert info.in_channels == 3 and info.image_size == (32, 32)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2616)


def test_cifar10_split_is_deterministic_by_split_seed(tmp_path, skip_md5):
    write_cifar10(tmp_path)
    first = build_data(data_config("cifar10", tmp_path, val_fraction=0.2, split_seed=0))
    again = build_data(data_config("cifar10", tmp_path, val_fraction=0.2, split_seed=0))
    other = build_data(data_config("cifar10", tmp_path, val_fraction=0.2, split_seed=1))

    assert len(first.train) == 40 and len(first.val) == 10 and len(first.test) == 10
    # train and val partition the official train split
    assert sorted(ids(first.train.images) + ids(first.val.images)) == list(range(50))
    assert ids(first.val.images) == ids(again.val.images)
    assert ids(first.val.images) != ids(other.val.images)
    # labels travel with their images
    assert first.val.labels.tolist() == [i % 10 for i in ids(first.val.images)]


def test_cifar100_reads_fine_labels(tmp_path, skip_md5):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, count in [("train", 20), ("test", 5)]:
        rows = np.full((count, 3072), 9, dtype=np.uint8)
        entry = {"data": rows, "fine_labels": [i % 100 for i in range(count)], "coarse_labels": []}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)

    bundle = build_data(data_config("cifar100", tmp_path, val_fraction=0.25))

    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 5, 5)
    assert bundle.info.num_classes == 100 and bundle.info.class_names[42] == "c42"
    assert bundle.info.mean == (0.5071, 0.4865, 0.4409)


# ----------------------------------------------------------------------------- MNIST


def test_idx_writer_uses_the_published_magic_numbers(tmp_path):
    write_mnist(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    images = (raw / "train-images-idx3-ubyte").read_bytes()
    labels = (raw / "train-labels-idx1-ubyte").read_bytes()
    assert struct.unpack(">4I", images[:16]) == (2051, 30, 28, 28)
    assert struct.unpack(">2I", labels[:8]) == (2049, 30)


@pytest.mark.parametrize(
    "name, folder, first_class, mean",
    [
        ("mnist", "MNIST", "0 - zero", 0.1307),
        ("fashion_mnist", "FashionMNIST", "T-shirt/top", 0.2860),
    ],
)
def test_mnist_family_reads_idx_files(tmp_path, name, folder, first_class, mean):
    train = write_mnist(tmp_path, folder)
    bundle = build_data(data_config(name, tmp_path, val_fraction=0.2, split_seed=3))

    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 10)
    assert bundle.train.images.shape == (24, 1, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert sorted(ids(bundle.train.images) + ids(bundle.val.images)) == list(range(30))
    # a pixel comes back at its row and column
    position = 4
    index = ids(bundle.train.images)[position]
    assert bundle.train.images[position, 0, 3, 20] == train[index, 3, 20]
    assert torch.equal(bundle.train.images[position, 0], torch.from_numpy(train[index]))
    assert bundle.train.labels[position] == index % 10

    info = bundle.info
    assert info.num_classes == 10 and info.class_names[0] == first_class
    assert info.in_channels == 1 and info.image_size == (28, 28) and info.mean == (mean,)

    again = build_data(data_config(name, tmp_path, val_fraction=0.2, split_seed=3))
    assert ids(again.val.images) == ids(bundle.val.images)


# ----------------------------------------------------------------------------- digits


def test_digits_splits_and_values():
    bundle = build_data(ImageDataConfig(name="digits", val_fraction=0.1, split_seed=0))

    sizes = (len(bundle.train), len(bundle.val), len(bundle.test))
    assert sum(sizes) == 1797 and sizes[2] == 359 and sizes[1] == 144
    images, labels = bundle.train.get_batch(torch.arange(len(bundle.train)))
    assert images.shape == (1294, 1, 8, 8) and images.dtype == torch.uint8
    expected_levels = {round(v * 255 / 16) for v in range(17)}
    assert set(images.unique().tolist()) <= expected_levels and images.max() == 255
    assert set(labels.tolist()) == set(range(10))

    info = bundle.info
    assert info.num_classes == 10 and info.class_names == [str(d) for d in range(10)]
    assert info.in_channels == 1 and info.image_size == (8, 8)
    assert 0.1 < info.mean[0] < 0.5 and 0.2 < info.std[0] < 0.5


def test_digits_test_split_is_fixed_whatever_val_fraction():
    with_val = build_data(ImageDataConfig(name="digits", val_fraction=0.1))
    without_val = build_data(ImageDataConfig(name="digits", val_fraction=0.0))
    other_seed = build_data(ImageDataConfig(name="digits", val_fraction=0.1, split_seed=1))

    assert without_val.val is None and len(without_val.train) == 1797 - 359
    assert torch.equal(with_val.test.images, without_val.test.images)
    assert not torch.equal(with_val.test.images, other_seed.test.images)


# ----------------------------------------------------------------------------- image folder



def test_image_folder_with_val_folder(tmp_path):
    write_folder(tmp_path, "train", per_class=2)
    write_folder(tmp_path, "val", per_class=1)
    write_png(tmp_path / "train" / "dog" / "gray.png", (77, 77, 77), mode="L")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")

    bundle = build_data(data_config("image_folder", tmp_path, image_size=8, val_fraction=0.5))

    assert (len(bundle.train), len(bundle.val), bundle.test) == (5, 2, None)
    images, labels = bundle.train.get_batch(torch.arange(5))
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 1, 1]
    assert (images[0].flatten(1) == torch.tensor(RED).unsqueeze(1)).all()
    assert (images[2].flatten(1) == torch.tensor(BLUE).unsqueeze(1)).all()
    assert (images[4] == 77).all()  # grayscale becomes three equal channels
    assert bundle.val.get_batch(torch.tensor([1]))[1].tolist() == [1]

    info = bundle.info
    assert info.class_names == ["cat", "dog"] and info.num_classes == 2
    assert info.in_channels == 3 and info.image_size == (8, 8)
    assert info.mean[1] == pytest.approx(77 / 255 / 5, abs=1e-3)


def test_image_folder_val_fraction_and_test_folder(tmp_path):
    write_folder(tmp_path, "train", per_class=4)
    write_folder(tmp_path, "test", per_class=1)

    bundle = build_data(data_config("image_folder", tmp_path, image_size=4, val_fraction=0.25))

    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 2, 2)
    assert set(bundle.train.paths).isdisjoint(bundle.val.paths)
    assert bundle.test.get_batch(torch.tensor([0, 1]))[0].shape == (2, 3, 4, 4)


def test_image_folder_reads_files_when_a_batch_is_asked_for(tmp_path):
    write_folder(tmp_path, "train", per_class=1)
    bundle = build_data(data_config("image_folder", tmp_path, image_size=4, val_fraction=0.0))
    write_png(tmp_path / "train" / "cat" / "0.png", BLUE)

    images, _ = bundle.train.get_batch(torch.tensor([0]))
    assert (images[0].flatten(1) == torch.tensor(BLUE).unsqueeze(1)).all()


def test_image_folder_refuses_val_class_unknown_to_train(tmp_path):
    write_folder(tmp_path, "train", per_class=1)
    write_png(tmp_path / "val" / "bird" / "0.png", RED)

    with pytest.raises(KdlError, match="bird"):
        build_data(data_config("image_folder", tmp_path))


# ----------------------------------------------------------------------------- missing data


def test_missing_cifar_names_the_absolute_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(KdlError) as caught:
        build_data(data_config("cifar10", "data"))

    message = str(caught.value)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in message
    assert "data.download: true" in message and "data_batch_1" in message


def test_missing_mnist_names_the_raw_folder(tmp_path):
    with pytest.raises(KdlError) as caught:
        build_data(data_config("fashion_mnist", tmp_path))

    assert str(tmp_path / "FashionMNIST" / "raw") in str(caught.value)
    assert "train-images-idx3-ubyte" in str(caught.value)


@pytest.mark.parametrize("name, module", [("cifar10", "cifar"), ("mnist", "mnist")])
def test_failed_download_is_a_clear_error(tmp_path, monkeypatch, name, module):
    def no_network(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    torchvision_module = getattr(torchvision.datasets, module)
    monkeypatch.setattr(torchvision_module, "download_and_extract_archive", no_network)

    with pytest.raises(KdlError) as caught:
        build_data(ImageDataConfig(name=name, root=str(tmp_path), download=True))

    message = str(caught.value)
    assert "could not download" in message and "https://" in message
    assert "name resolution" in message and "data.download: false" in message


@pytest.mark.parametrize("make_root", [False, True])
def test_missing_image_folder_names_the_folder_and_layout(tmp_path, make_root):
    root = tmp_path / "pets"
    if make_root:
        root.mkdir()

    with pytest.raises(KdlError) as caught:
        build_data(data_config("image_folder", root))

    message = str(caught.value)
    assert str(root) in message and "ROOT/train/<class>/<image>" in message
    assert ("has no train/ folder" in message) == make_root


def test_a_corrupt_image_is_an_error_naming_it_or_skipped_and_counted(tmp_path, capsys):
    write_folder(tmp_path, "train", per_class=3)
    broken = tmp_path / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(KdlError, match=r"1 file\(s\) in .* are not images PIL can read, e\.g\. "
                                       r".*broken\.png.*data\.skip_bad_files: true"):
        build_data(data_config("image_folder", tmp_path, image_size=4, val_fraction=0.0))
    bundle = build_data(data_config("image_folder", tmp_path, image_size=4, val_fraction=0.0,
                                    skip_bad_files=True))
    assert len(bundle.train) == 6 and str(broken) not in bundle.train.paths
    assert "left out 1 unreadable file(s)" in capsys.readouterr().err
    bundle.train.paths[0] = str(broken)  # damaged after the scan: named when its batch is read
    with pytest.raises(KdlError, match=r"cannot read .*broken\.png"):
        bundle.train.get_batch(torch.tensor([0]))
