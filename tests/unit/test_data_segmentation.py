"""Segmentation data: the shapes drawn from a seed into VOC's layout with correct COCO and VOC
boxes, written once and never over a folder that is not kdl's; the same crop and flip for an
image and its mask; the ignore index out of the metrics; Pascal VOC's palette and layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import voc_palette, write_voc
from PIL import Image

from karpathy_runner.config.data import SegmentationDataConfig, ShapesDataConfig
from karpathy_runner.config.models import UNetConfig
from karpathy_runner.config.tasks import SegmentConfig
from karpathy_runner.data import build_data
from karpathy_runner.data import shapes as shapes_module
from karpathy_runner.data.segmentation import IGNORE_INDEX, augment_pairs
from karpathy_runner.errors import KdlError
from karpathy_runner.tasks.segment import Segment
from karpathy_runner.tasks.steps import Totals


def shapes(root: Path, **settings) -> ShapesDataConfig:
    return ShapesDataConfig(root=str(root), **{"train_images": 12, "val_images": 4, "test_images": 0,
                                               "image_size": 24, **settings})


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shapes_are_a_function_of_the_seed_in_vocs_layout(tmp_path):
    first = build_data(shapes(tmp_path / "a"))
    build_data(shapes(tmp_path / "b"))
    build_data(shapes(tmp_path / "c", data_seed=1))
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a") != digests(tmp_path / "c")
    folder = tmp_path / "a"
    assert (folder / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [
        f"train_{i:06d}" for i in range(12)]
    with Image.open(folder / "SegmentationClass" / "train_000000.png") as mask:
        assert mask.mode == "P" and mask.getpalette() == voc_palette()[:len(mask.getpalette())]
    with Image.open(folder / "JPEGImages" / "train_000000.jpg") as image:
        assert image.format == "JPEG" and image.size == (24, 24)
    info = first.info
    assert (info.kind, info.num_classes, info.class_names) == (
        "segmentation", 4, ["background", "rectangle", "ellipse", "triangle"])
    assert first.train.masks.shape == (12, 24, 24) and first.test is None
    assert set(first.train.masks.unique().tolist()) <= {0, 1, 2, 3}


def test_shapes_boxes_are_the_extents_of_their_objects_in_coco_and_voc(tmp_path):
    build_data(shapes(tmp_path / "s", train_images=6, max_shapes=4))
    folder = tmp_path / "s"
    coco = json.loads((folder / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["rectangle", "ellipse", "triangle"]
    for image in coco["images"]:
        name = Path(image["file_name"]).stem
        instances = np.asarray(Image.open(folder / "SegmentationObject" / f"{name}.png"))
        classes = np.asarray(Image.open(folder / "SegmentationClass" / f"{name}.png"))
        objects = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(objects) == instances.max() >= 1
        xml = ET.parse(folder / "Annotations" / f"{name}.xml").getroot()
        assert [o.find("name").text for o in xml.iter("object")] == [
            coco["categories"][a["category_id"] - 1]["name"] for a in objects]
        for number, (annotation, node) in enumerate(zip(objects, xml.iter("object"), strict=True), 1):
            rows, cols = np.nonzero(instances == number)
            x, y, w, h = annotation["bbox"]
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
            assert annotation["area"] == len(rows)
            assert set(classes[rows, cols].tolist()) == {annotation["category_id"]}
            box = [int(node.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert box == [x + 1, y + 1, x + w, y + h]  # VOC: 1-based, both corners inclusive


def test_shapes_are_read_not_drawn_again_and_replace_only_their_own(tmp_path, capsys):
    root = tmp_path / "shapes"
    build_data(shapes(root))
    assert "drawing" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    build_data(shapes(root))
    assert capsys.readouterr().err == "" and {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    bundle = build_data(shapes(root, train_images=5))  # kdl's own folder, other settings: drawn again
    assert "other settings (train_images 12 -> 5)" in capsys.readouterr().err and len(bundle.train) == 5
    assert len(list(tmp_path.iterdir())) == 1  # no temporary folder left beside it


@pytest.mark.parametrize("kind", ["folder", "file", "link"])
def test_shapes_never_write_over_what_is_not_theirs(tmp_path, kind):
    root = tmp_path / "data"
    if kind == "folder":
        root.mkdir()
        (root / "notes.txt").write_text("mine")
    elif kind == "file":
        root.write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        root.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KdlError, match=f"data.root: {root}"):
        build_data(shapes(root))
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        {"folder": ["data", "notes.txt"], "file": ["data"], "link": ["data", "elsewhere"]}[kind])


def test_a_draw_cut_short_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(*args)

    original = shapes_module._draw_image
    monkeypatch.setattr(shapes_module, "_draw_image", failing)
    with pytest.raises(OSError):
        build_data(shapes(tmp_path / "shapes"))
    assert list(tmp_path.iterdir()) == []


def test_only_this_machines_dead_draws_are_cleared_beside_the_shapes(tmp_path, monkeypatch):
    """The ranks of a run over several machines draw the shapes into one shared data.root: a
    temporary folder of another machine's process is left alone (its pid means nothing here, and
    it may be drawing now); this machine's dead processes' go, an older kdl's name included."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)
    monkeypatch.setenv("KDL_HOST", "node-b")
    other, ours, older = (tmp_path / f".shapes.tmp-{tag}{dead}-0a1b2c3d"
                          for tag in ("node-a-", "node-b-", ""))
    for temp in (other, ours, older):
        (temp / "JPEGImages").mkdir(parents=True)
    build_data(shapes(tmp_path / "shapes"))
    assert (other.exists(), ours.exists(), older.exists()) == (True, False, False)
    assert (tmp_path / "shapes" / shapes_module.MANIFEST).is_file()


def test_another_process_that_puts_the_same_shapes_in_place_first_wins_without_an_error(
        tmp_path, monkeypatch):
    """Two processes (a run's ranks) replace kdl's folder of other settings at once: when the
    other's new folder lands between this one's two renames (the old folder moved aside, its own
    moved in), the other's stays and this one goes on with it, leaving nothing beside it."""
    root, twin = tmp_path / "shapes", tmp_path / "twin"
    build_data(shapes(root))
    build_data(shapes(twin, train_images=5))  # what the other process drew, ready to move in
    rename = os.rename

    def other_lands_first(source, target):
        rename(source, target)
        if Path(source) == root:  # ours moved the old folder aside: the other's lands now
            rename(twin, root)

    monkeypatch.setattr(shapes_module.os, "rename", other_lands_first)
    bundle = build_data(shapes(root, train_images=5))
    assert len(bundle.train) == 5 and [p.name for p in tmp_path.iterdir()] == ["shapes"]


def test_the_same_crop_and_flip_move_an_image_and_its_mask():
    """Each mask pixel equals its image's red value (both encode the position), so after
    augmenting they still agree wherever the mask is not padding, and padding is ignored."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 200, (32, 9, 9), dtype=torch.uint8, generator=generator)
    images = torch.stack([masks, masks // 2, masks // 3], dim=1)  # (B, 3, H, W)
    cropped_images, cropped = augment_pairs(images, masks, ("crop", "flip"), 3, generator)
    labelled = cropped != IGNORE_INDEX
    assert torch.equal(cropped_images[:, 0][labelled], cropped[labelled])
    assert torch.equal(cropped_images[:, 1][labelled], cropped[labelled] // 2)
    assert (cropped_images.permute(0, 2, 3, 1)[~labelled] == 0).all() and (~labelled).any()
    assert sum(not torch.equal(cropped[i], masks[i]) for i in range(32)) > 24  # most moved
    flipped_images, flipped = augment_pairs(images, masks, ("flip",), 0, generator)  # flips alone
    mirrored = [torch.equal(flipped[i], masks[i].flip(1)) for i in range(32)]
    assert 0 < sum(mirrored) < 32
    assert all(torch.equal(flipped[i], masks[i]) for i in range(32) if not mirrored[i])
    assert torch.equal(flipped_images[:, 0], flipped)


def test_miou_leaves_out_the_ignore_index_and_classes_in_neither(tmp_path):
    info = build_data(shapes(tmp_path / "s")).info
    task = Segment(SegmentConfig(), UNetConfig(channels=[4, 8]), info, torch.device("cpu"))
    masks = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, IGNORE_INDEX]]])  # (1, 2, 4): no class 2 or 3
    predicted = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 3]]])  # wrong on the ignored pixel only: 3
    logits = torch.nn.functional.one_hot(predicted, 4).permute(0, 3, 1, 2).float() * 10
    task.models["model"] = lambda x: logits
    result = task.eval_step((torch.zeros(1, 3, 2, 4), masks), detailed=True)
    totals = Totals(count=1, losses={"loss": float(result.losses["loss"])}, sums=result.sums)
    metrics = task.summarize(totals, detailed=True)
    # background: 3 right of 4 true (one called class 1); class 1: 3 right, one false positive
    assert result.sums["confusion"].tolist() == [[3, 1, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert metrics["per_class_iou"] == {"background": 3 / 4, "rectangle": 3 / 4, "ellipse": None,
                                        "triangle": None}
    assert metrics["miou"] == pytest.approx(0.75) and metrics["pixel_accuracy"] == pytest.approx(6 / 7)


def test_voc_reads_its_lists_resizes_masks_by_nearest_and_names_a_missing_file(tmp_path):
    folder = write_voc(tmp_path / "VOCdevkit" / "VOC2012", {"train": 3, "val": 2}, size=40)
    cfg = SegmentationDataConfig(name="voc", root=str(tmp_path), download=False, image_size=16)
    bundle = build_data(cfg)
    assert (len(bundle.train), len(bundle.val), bundle.info.num_classes) == (3, 2, 21)
    assert bundle.info.class_names[15] == "person" and voc_palette()[45:48] == [192, 128, 128]
    assert bundle.train.images.shape == (3, 3, 16, 16)
    assert set(bundle.train.masks.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}  # never blended
    (folder / "JPEGImages" / "2008_000001.jpg").unlink()
    with pytest.raises(KdlError, match="2008_000001.jpg"):
        build_data(cfg)
    cfg = SegmentationDataConfig(name="voc", root=str(tmp_path / "none"), download=False)
    with pytest.raises(KdlError, match="set data.download: true"):
        build_data(cfg)


def test_a_colour_mask_is_refused_naming_it(tmp_path):
    folder = write_voc(tmp_path / "VOCdevkit" / "VOC2012", {"train": 2, "val": 1})
    bad = folder / "SegmentationClass" / "2007_000001.png"
    Image.open(bad).convert("RGB").save(bad)
    with pytest.raises(KdlError, match=f"{bad}: a mask must be a PNG of class indices.*mode RGB"):
        build_data(SegmentationDataConfig(name="voc", root=str(tmp_path), download=False))
