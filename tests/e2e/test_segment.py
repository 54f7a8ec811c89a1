"""Semantic segmentation through the unchanged command line: the shapes quick start trained, its
mIoU and per-class IoU evaluated, its masks predicted as PNG files; Pascal VOC's layout and a
plain images/ + masks/ pair read; a mask outside the classes refused naming its file;
torchvision's segmentation models built offline from what the torch cache holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datafiles import square_pair, write_mask_folder, write_mask_png, write_voc
from kdl import CONFIGS, kdl
from PIL import Image
from stopping import read_json, sets

# the shapes quick start, shrunk: 16x16 images, 48 of them (a two-level U-Net unless a test
# names another model)
TINY = ["data.image_size=16", "data.train_images=48", "data.val_images=16", "data.test_images=8",
        "data.batch_size=8", "train.epochs=2", "train.device=cpu", "train.log_every_steps=2"]
UNET = ["model.channels=[4,8]"]

pytestmark = pytest.mark.usefixtures("single_thread")


def train_segment(tmp_path: Path, *overrides: str):
    """The shrunk shapes quick start, its images drawn into tmp_path/shapes."""
    return kdl("train", CONFIGS / "shapes_segment.yaml",
               *sets([*TINY, f"data.root={tmp_path / 'shapes'}", *overrides]),
               "--runs-dir", tmp_path / "runs", "--quiet")


def train_config(tmp_path: Path, data: dict, model: dict, *overrides: str):
    """A config of its own (the repository's set other models' keys): one epoch on the CPU."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"name": "segment_test", "data": {"batch_size": 4, **data},
                                    "model": model, "train": {"epochs": 1, "device": "cpu"}}))
    return kdl("train", path, *sets(overrides), "--runs-dir", tmp_path / "runs", "--quiet")


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segment")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        result = train_segment(tmp, *UNET)
    assert result.exit_code == 0, result.stderr
    return tmp / "runs" / result.last_line


def test_the_shapes_run_records_pixel_accuracy_and_miou_and_keeps_the_best(shapes_run):
    records = [json.loads(line) for line in (shapes_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 2 and all({"loss", "pixel_accuracy", "miou"} <= r.keys() for r in val)
    assert all(0.0 <= r["miou"] <= 1.0 and 0.0 <= r["pixel_accuracy"] <= 1.0 for r in val)
    assert {"loss", "pixel_accuracy"} <= next(r for r in records if r["split"] == "train").keys()
    best = read_json(shapes_run / "summary.json")["best"]
    assert best["metric"] == "val.miou" and best["mode"] == "max"
    assert best["value"] == max(r["miou"] for r in val)


def test_eval_reports_per_class_iou_on_the_test_split(shapes_run):
    result = kdl("eval", shapes_run.name, "--split", "test", "--runs-dir", shapes_run.parent, "--json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert list(metrics["per_class_iou"]) == ["background", "rectangle", "ellipse", "triangle"]
    known = [v for v in metrics["per_class_iou"].values() if v is not None]
    assert metrics["miou"] == pytest.approx(sum(known) / len(known))
    shown = kdl("eval", shapes_run.name, "--split", "test", "--runs-dir", shapes_run.parent)
    assert "per-class iou" in shown.stdout and "triangle" in shown.stdout


def test_predict_writes_palette_masks_at_each_inputs_size(shapes_run, tmp_path):
    image, _ = square_pair(3, 24, 4)
    image.resize((30, 22)).save(tmp_path / "wide.jpg")
    (tmp_path / "more").mkdir()
    image.save(tmp_path / "more" / "wide.png")  # the same name: its mask gets another
    out = tmp_path / "masks"
    result = kdl("predict", shapes_run.name, tmp_path / "wide.jpg", tmp_path / "more", "--out", out,
                 "--json", "--runs-dir", shapes_run.parent)
    assert result.exit_code == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [Path(p["mask"]).name for p in predictions] == ["wide.png", "wide-1.png"]
    for prediction, size in zip(predictions, [(30, 22), (24, 24)], strict=True):
        with Image.open(prediction["mask"]) as mask:
            assert mask.mode == "P" and mask.size == size
            assert mask.getpalette()[3:6] == [128, 0, 0]  # VOC's colour of class 1
            shares = np.bincount(np.asarray(mask).ravel(), minlength=4) / (size[0] * size[1])
        assert {c["class"]: c["share"] for c in prediction["classes"]} == pytest.approx(
            {name: share for name, share in zip(["background", "rectangle", "ellipse", "triangle"],
                                                shares.tolist(), strict=True) if share}, abs=1e-6)
    plain = kdl("predict", shapes_run.name, tmp_path / "wide.jpg", "--out", out, "--runs-dir",
                shapes_run.parent)
    assert plain.exit_code == 0 and plain.stdout.split("\t")[:2] == [str(tmp_path / "wide.jpg"),
                                                                      str(out / "wide.png")]


def test_predict_refuses_options_a_segmentation_ignores_and_a_link_as_out(shapes_run, tmp_path):
    image, _ = square_pair(0, 16, 4)
    image.save(tmp_path / "a.png")
    top = kdl("predict", shapes_run.name, tmp_path / "a.png", "--top-k", "2", "--runs-dir", shapes_run.parent)
    assert top.exit_code == 2 and "--top-k does not apply to a segment run" in top.stderr
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    linked = kdl("predict", shapes_run.name, tmp_path / "a.png", "--out", tmp_path / "link", "--runs-dir",
                 shapes_run.parent)
    assert linked.exit_code == 2 and "symbolic link" in linked.stderr
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_classifier_predicts_as_it_did_and_refuses_out(trained, tmp_path):
    """Classification's predictions through the hook's default: the input, then each class with
    its probability to 3 places (tab-separated); JSON to 6 places; --out is not its option."""
    image, _ = square_pair(0, 8, 4)
    image.save(tmp_path / "a.png")
    shown = kdl("predict", trained.name, tmp_path / "a.png", "--top-k", "3", "--runs-dir", trained.parent)
    as_json = kdl("predict", trained.name, tmp_path / "a.png", "--top-k", "3", "--json", "--runs-dir",
                  trained.parent)
    record = json.loads(as_json.stdout)
    assert record.keys() == {"run", "checkpoint", "predictions"}
    (prediction,) = record["predictions"]
    assert prediction.keys() == {"input", "classes"} and len(prediction["classes"]) == 3
    assert all(c.keys() == {"class", "probability"} for c in prediction["classes"])
    assert shown.stdout == "\t".join([str(tmp_path / "a.png"), *(f"{c['class']} {c['probability']:.3f}"
                                                               for c in prediction["classes"])]) + "\n"
    result = kdl("predict", trained.name, tmp_path / "a.png", "--out", tmp_path / "o", "--runs-dir",
                 trained.parent)
    assert result.exit_code == 2 and "--out does not apply to a classify run" in result.stderr


def test_voc_layout_trains_and_a_class_outside_the_palette_names_its_file(tmp_path):
    voc = write_voc(tmp_path / "VOCdevkit" / "VOC2012", {"train": 8, "val": 4})
    data = {"name": "voc", "root": str(tmp_path), "download": False, "image_size": 16}
    result = train_config(tmp_path, data, {"name": "unet", "channels": [4, 8]})
    assert result.exit_code == 0, result.stderr
    summary = read_json(tmp_path / "runs" / result.last_line / "summary.json")
    assert 0.0 <= summary["final"]["val.miou"] <= 1.0
    # a mask that holds class 21 (VOC has 0 to 20, and 255 to ignore)
    bad = voc / "SegmentationClass" / "2008_000002.png"
    _, mask = square_pair(1002, 20, 21)
    mask[0, 0] = 21
    write_mask_png(bad, mask)
    refused = train_config(tmp_path, data, {"name": "unet", "channels": [4, 8]})
    assert refused.exit_code == 2
    assert str(bad) in refused.stderr and "class 21" in refused.stderr and "Traceback" not in refused.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 1  # no run folder for the refused one


def test_a_folder_pair_trains_with_its_class_names_and_refuses_an_index_beyond_them(tmp_path):
    root = write_mask_folder(tmp_path / "pairs", 12, num_classes=3)
    data = {"name": "segmentation_folder", "root": str(root), "image_size": 16, "val_fraction": 0.25,
            "class_names": ["sky", "sea", "boat"]}
    result = train_config(tmp_path, data, {"name": "unet", "channels": [4, 8]})
    assert result.exit_code == 0, result.stderr
    evaluated = kdl("eval", result.last_line, "--runs-dir", tmp_path / "runs", "--json")
    assert list(json.loads(evaluated.stdout)["metrics"]["per_class_iou"]) == ["sky", "sea", "boat"]
    Image.fromarray(np.full((20, 20), 7, dtype=np.uint8), mode="L").save(root / "masks" / "img005.png")
    refused = train_config(tmp_path, data, {"name": "unet", "channels": [4, 8]})
    assert refused.exit_code == 2
    assert str(root / "masks" / "img005.png") in refused.stderr and "class 7" in refused.stderr
    assert "data.num_classes" in refused.stderr


@pytest.mark.parametrize("model", [{"name": "lraspp"}, {"name": "deeplabv3", "aux_loss": True}])
def test_torchvision_models_start_from_what_is_cached_and_say_so(tmp_path, monkeypatch, model):
    """No weights in the torch cache and model.download false (the tests' network is never
    used): the model trains from random weights, and stderr says why."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "image_size": 32, "train_images": 16,
            "val_images": 4, "test_images": 0}
    result = train_config(tmp_path, data, model, "train.max_steps=2")
    assert result.exit_code == 0, result.stderr
    assert "not in the torch cache" in result.stderr and "random weights" in result.stderr
    assert not (tmp_path / "torch").exists()  # nothing was fetched
