"""Transfer learning from torchvision models, and `kdl predict` on images and texts."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from datafiles import write_csv
from kdl import CONFIGS, kdl
from PIL import Image
from stopping import final_state, sets

from karpathy_runner.build import build_experiment
from karpathy_runner.config.loading import load_config, resolve
from karpathy_runner.optim import build_optimizer

ARCH = "mobilenet_v3_small"  # the smallest torchvision classifier with batch norm: fast on a CPU
HEAD = "classifier.3"  # its last linear layer
COLORS = {"cat": (220, 40, 30), "dog": (30, 50, 220)}


def write_jpegs(root: Path, split: str, per_class: int) -> None:
    """ROOT/split/<class>/<i>.jpg: noisy reddish cats and bluish dogs, of several sizes."""
    rng = np.random.default_rng(len(split) + per_class)
    for name, color in COLORS.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (24 + 4 * i, 18 + 2 * i)  # (H, W): never the model's size
            pixels = np.clip(np.array(color) + rng.normal(0, 25, (*size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg", quality=90)


def transfer_sets(data: Path, weights: Path, *extra: str) -> list[str]:
    return sets([
        f"data.root={data}", "data.batch_size=4", "data.val_fraction=0", "data.num_workers=0",
        f"model.arch={ARCH}", f"model.pretrained={weights}",
        "train.device=cpu", "train.epochs=3", "train.best_metric=train.loss",
        "optimizer.lr=0.01", *extra,
    ])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A local 'pretrained' state dict, a folder of JPEGs, and a run fine-tuning the head alone."""
    root = tmp_path_factory.mktemp("transfer")
    torch.manual_seed(1)
    pretrained = torchvision.models.get_model(ARCH)
    # batch-norm statistics of pictures like the test's (normalised as ImageNet's): random
    # weights then still tell red from blue, as pretrained ones would
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    colors = torch.tensor(list(COLORS.values())).float().div(255).repeat(4, 1)  # (8, 3)
    pictures = colors[:, :, None, None] + 0.1 * torch.randn(8, 3, 96, 96)  # (8, 3, 96, 96)
    pictures = (pictures - mean[:, None, None]) / std[:, None, None]
    for module in pretrained.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        pretrained.train()(pictures)
    torch.save(pretrained.state_dict(), root / "weights.pt")
    write_jpegs(root / "pictures", "train", 4)
    write_jpegs(root / "held", "new", 2)
    runs = root / "runs"
    overrides = transfer_sets(root / "pictures", root / "weights.pt", "model.freeze=backbone")
    result = kdl("train", CONFIGS / "transfer_resnet18.yaml", *overrides, "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.stderr
    return root, runs / result.last_line


def test_a_frozen_backbone_keeps_its_pretrained_weights_and_statistics_and_the_head_learns(finetuned):
    root, folder = finetuned
    saved = torch.load(root / "weights.pt", weights_only=True)
    trained = final_state(folder)["models"]["model"]
    body = [key for key in saved if not key.startswith(HEAD)]
    assert any("running_mean" in key for key in body)
    for key in body:  # parameters and batch-norm statistics alike
        assert torch.equal(trained[f"net.{key}"], saved[key]), key
    cfg = load_config(folder / "config.yaml")
    start = build_experiment(cfg, training=False).task.model.state_dict()
    assert trained[f"net.{HEAD}.weight"].shape == (2, 1024)  # cat, dog
    assert not torch.equal(trained[f"net.{HEAD}.weight"], start[f"net.{HEAD}.weight"])
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_image_folders_get_the_weights_own_resize_crop_and_normalisation(finetuned):
    root, folder = finetuned
    exp = build_experiment(load_config(folder / "config.yaml"), training=False)
    info = exp.data.info
    assert info.image_size == (224, 224) and info.class_names == ["cat", "dog"]
    assert info.mean == pytest.approx((0.485, 0.456, 0.406))
    assert info.std == pytest.approx((0.229, 0.224, 0.225))
    images, _ = exp.data.train.get_batch(torch.arange(2))
    assert images.shape == (2, 3, 224, 224)  # 24x18 pictures: shorter side to 256, centre 224


@pytest.mark.parametrize("placement", ["stream", "device"])
def test_new_images_are_read_as_the_training_images_were(finetuned, placement):
    """`kdl predict` reads new pictures with the weights' resize and centre crop, whether the
    training folder streams from disk or was decoded onto the device; and the weights are read
    once, never by the parameter count on the meta device that comes first."""
    import karpathy_runner.models.zoo as zoo

    root, folder = finetuned
    devices, real = [], zoo._load_local
    cfg = load_config(folder / "config.yaml", [f"data.placement={placement}"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zoo, "_load_local", lambda net, *args: (devices.append(
            next(net.parameters()).device.type), real(net, *args))[1])
        exp = build_experiment(cfg, training=False)
    assert devices == ["cpu"]
    images, _ = exp.data.inputs.batch([str(root / "held" / "new" / "cat" / "0.jpg")])
    assert images.shape == (1, 3, 224, 224)
    cropped = exp.data.inputs.batch([str(root / "pictures" / "train" / "cat" / "1.jpg")])[0]
    trained = exp.data.train.get_batch(torch.tensor([1]))[0]  # the same picture, as it trained
    assert torch.equal(cropped, trained.cpu())


def test_predict_names_the_image_folder_classes_of_new_jpegs(finetuned):
    root, folder = finetuned
    held = root / "held" / "new"
    result = kdl("predict", folder.name, held / "cat" / "0.jpg", held / "dog", "--top-k", "2",
                 "--json", "--runs-dir", folder.parent)
    assert result.exit_code == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [Path(p["input"]).parent.name for p in predictions] == ["cat", "dog", "dog"]
    for p in predictions:
        assert {c["class"] for c in p["classes"]} == {"cat", "dog"}
        assert sum(c["probability"] for c in p["classes"]) == pytest.approx(1.0, abs=1e-4)
        assert p["classes"][0]["class"] == Path(p["input"]).parent.name  # red cats, blue dogs
    plain = kdl("predict", folder.name, held / "cat" / "1.jpg", "--runs-dir", folder.parent)
    assert plain.exit_code == 0 and plain.stdout.split("\t")[1].startswith("cat ")


def test_predict_refuses_what_is_not_an_image(finetuned, tmp_path):
    root, folder = finetuned
    missing = kdl("predict", folder.name, tmp_path / "nope.jpg", "--runs-dir", folder.parent)
    assert missing.exit_code == 2 and "no such image file or folder" in missing.stderr
    (tmp_path / "notes.jpg").write_text("not a picture")
    broken = kdl("predict", folder.name, tmp_path / "notes.jpg", "--runs-dir", folder.parent)
    assert broken.exit_code == 2 and "cannot read an image" in broken.stderr
    # PNG headers of 30000x30000 and 10000x10000 pixels (an error and a warning in PIL's
    # decompression-bomb check): refused by their size, before a pixel is decoded
    for side in (30_000, 10_000):
        png_header(tmp_path / f"huge{side}.png", side)
        huge = kdl("predict", folder.name, tmp_path / f"huge{side}.png", "--runs-dir", folder.parent)
        assert huge.exit_code == 2 and f"huge{side}.png" in huge.stderr, huge.stderr
        assert "could be decompression bomb" in huge.stderr and "Resize it first" in huge.stderr
        assert "Warning" not in huge.stderr and "Traceback" not in huge.stderr


def png_header(path: Path, side: int) -> None:
    """A PNG whose header says side x side gray pixels, with one tiny (invalid) data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


def _classifier(**model) -> dict:
    return {"data": {"name": "image_folder", "root": "unused"},
            "model": {"name": "torchvision", "arch": ARCH, **model}}


def test_freeze_until_a_layer_and_a_slower_backbone(tmp_path):
    write_jpegs(tmp_path, "train", 2)
    data = {"name": "image_folder", "root": str(tmp_path), "val_fraction": 0, "batch_size": 2}
    cfg = resolve({**_classifier(freeze="until:features.2", backbone_lr_scale=0.1), "data": data,
                   "train": {"device": "cpu", "best_metric": "train.loss"}})
    task = build_experiment(cfg).task
    names = {n: p.requires_grad for n, p in task.model.net.named_parameters()}
    assert not any(v for n, v in names.items() if n.startswith(("features.0.", "features.2.")))
    assert all(v for n, v in names.items() if n.startswith(("features.3.", HEAD)))
    groups = build_optimizer(cfg.optimizer, task.param_groups("model")).param_groups
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    head = task.model.net.get_submodule(task.model.head_name)
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in head.parameters()]
    task.train(True)  # frozen batch norm stays in eval mode; the rest trains
    modes = {n: m.training for n, m in task.model.net.named_modules()
             if isinstance(m, torch.nn.BatchNorm2d)}
    assert not modes["features.0.1"] and modes["features.3.block.0.1"]


@pytest.mark.parametrize("model, message", [
    ({"arch": "resnet81"}, "Did you mean resnet18"),
    ({"freeze": "until:layer9"}, "no layer 'layer9'"),
    ({"pretrained": "missing.pt"}, "is not a file"),
])
def test_transfer_mistakes_are_clear_errors(tmp_path, model, message):
    write_jpegs(tmp_path, "train", 2)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({**_classifier(**model), "data": {
        "name": "image_folder", "root": str(tmp_path), "batch_size": 2}, "train": {"device": "cpu"}}))
    result = kdl("train", config, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_predict_classifies_texts_given_as_arguments_or_in_a_file(tmp_path):
    rows = [["great fun", "pos"], ["loved it", "pos"], ["awful mess", "neg"], ["hated it", "neg"]] * 8
    train = write_csv(tmp_path / "reviews.csv", ["text", "label"], rows)
    result = kdl("train", CONFIGS / "imdb_lstm.yaml", *sets([
        "data.name=text_files", f"data.train_file={train}", "data.batch_size=8",
        "model.embedding_size=8", "model.hidden_size=8", "model.layers=1", "train.epochs=15",
        "train.device=cpu", "optimizer.lr=0.05"]), "--runs-dir", tmp_path / "runs", "--quiet")
    assert result.exit_code == 0, result.stderr
    lines = tmp_path / "lines.txt"
    lines.write_text("loved it\n\nawful mess\n")
    predicted = kdl("predict", result.last_line, "great fun", lines, "--json", "--top-k", "5",
                    "--runs-dir", tmp_path / "runs")
    assert predicted.exit_code == 0, predicted.stderr
    out = json.loads(predicted.stdout)["predictions"]
    assert [p["input"] for p in out] == ["great fun", "loved it", "awful mess"]
    assert [len(p["classes"]) for p in out] == [2, 2, 2]  # --top-k beyond the classes: all
    assert [p["classes"][0]["class"] for p in out] == ["pos", "pos", "neg"]

    # a folder: each .txt file one text, shown by its path; a FIFO is no text
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "a.txt").write_text("awful\nmess\n")
    (folder / "b.txt").write_text("great fun")
    (folder / "notes.md").write_text("not read")
    read = kdl("predict", result.last_line, folder, "--json", "--runs-dir", tmp_path / "runs")
    assert read.exit_code == 0, read.stderr
    out = json.loads(read.stdout)["predictions"]
    assert [(p["input"], p["classes"][0]["class"]) for p in out] == [
        (str(folder / "a.txt"), "neg"), (str(folder / "b.txt"), "pos")]
    os.mkfifo(tmp_path / "fifo")
    fifo = kdl("predict", result.last_line, tmp_path / "fifo", "--runs-dir", tmp_path / "runs")
    assert fifo.exit_code == 2 and f"{tmp_path / 'fifo'} is a FIFO (named pipe)" in fifo.stderr


def test_imagenet_weights_offline_are_an_error_and_stdout_keeps_only_run_ids(tmp_path, monkeypatch):
    """torch.hub says "Downloading: ..." on stdout before it fails offline: kdl sends it to
    stderr, where its progress goes, so that a script reading stdout never takes it for a run."""
    import urllib.error

    import torch.hub

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    write_jpegs(tmp_path, "train", 2)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({**_classifier(pretrained="imagenet"), "data": {
        "name": "image_folder", "root": str(tmp_path), "batch_size": 2}, "train": {"device": "cpu"}}))
    result = kdl("train", config, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "could not get torchvision's" in result.stderr
    assert "Downloading" in result.stderr and result.stdout == ""
