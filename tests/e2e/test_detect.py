"""Object detection through the unchanged command line: the shapes' boxes trained with Faster
R-CNN, its mAP metrics recorded and per-class AP evaluated, boxes predicted as JSON and drawn, the
detector exported; the shapes folder's COCO instances JSON read (an image without boxes trained on
as background); an empty or out-of-image box and an unknown category id refused naming their file; stopped and
resumed equals uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from kdl import CONFIGS, kdl
from PIL import Image
from stopping import assert_resumes_after_random_kill, read_json, sets

from karpathy_runner import export
from karpathy_runner.data.detection import BoxInputs

# the shapes detection quick start, shrunk: 32x32 images, 16 of them, Faster R-CNN at 32 pixels
TINY = ["data.image_size=32", "data.train_images=16", "data.val_images=8", "data.test_images=4",
        "data.batch_size=4", "model.min_size=32", "train.epochs=1", "train.device=cpu",
        "train.log_every_steps=2"]
CLASSES = ["rectangle", "ellipse", "triangle"]

pytestmark = pytest.mark.usefixtures("single_thread")


def train_detect(tmp_path: Path, *overrides: str):
    return kdl("train", CONFIGS / "shapes_detect.yaml",
               *sets([*TINY, f"data.root={tmp_path / 'shapes'}", *overrides]),
               "--runs-dir", tmp_path / "runs", "--quiet")


def train_coco(tmp_path: Path, shapes: Path):
    """The shapes folder read as COCO: its instances JSON and JPEGImages/."""
    path = tmp_path / "coco.yaml"
    path.write_text(yaml.safe_dump({
        "name": "coco_test",
        "data": {"name": "coco", "root": str(shapes), "image_size": 32, "batch_size": 4,
                 "train_annotations": "annotations/instances_train.json", "train_images": "JPEGImages",
                 "val_annotations": "annotations/instances_val.json", "val_images": "JPEGImages"},
        "model": {"name": "fasterrcnn_mobilenet_v3_large_fpn", "min_size": 32},
        "train": {"epochs": 1, "device": "cpu", "max_steps": 2}}))
    return kdl("train", path, "--runs-dir", tmp_path / "coco-runs", "--quiet")


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detect")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        result = train_detect(tmp)
    assert result.exit_code == 0, result.stderr
    return tmp / "runs" / result.last_line


def test_the_shapes_run_records_map_and_keeps_the_best(shapes_run):
    records = [json.loads(line) for line in (shapes_run / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if r["split"] == "val"]
    assert {"map", "map_50", "map_75", "mar_100"} <= val.keys()
    assert all(0.0 <= val[name] <= 1.0 for name in ("map", "map_50", "map_75", "mar_100"))
    assert "loss" in next(r for r in records if r["split"] == "train")
    best = read_json(shapes_run / "summary.json")["best"]
    assert best["metric"] == "val.map" and best["mode"] == "max" and best["value"] == val["map"]


def test_eval_reports_per_class_ap_on_the_test_split(shapes_run):
    result = kdl("eval", shapes_run.name, "--split", "test", "--runs-dir", shapes_run.parent, "--json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert list(metrics["per_class_ap"]) == CLASSES
    assert {"map", "map_50", "map_75", "mar_100"} <= metrics.keys()


def _wide(shapes_run: Path, tmp_path: Path) -> Path:
    """A val image resized to 48x40: not the run's 32x32."""
    with Image.open(shapes_run.parent.parent / "shapes" / "JPEGImages" / "val_000000.jpg") as image:
        image.resize((48, 40)).save(tmp_path / "wide.jpg")
    return tmp_path / "wide.jpg"


def test_predict_prints_boxes_at_the_inputs_size_and_draws_them(shapes_run, tmp_path):
    _wide(shapes_run, tmp_path)
    out = tmp_path / "drawn"
    result = kdl("predict", shapes_run.name, tmp_path / "wide.jpg", "--out", out, "--json",
                 "--runs-dir", shapes_run.parent)
    assert result.exit_code == 0, result.stderr
    (prediction,) = json.loads(result.stdout)["predictions"]
    assert Path(prediction["drawing"]) == out / "wide.png"
    with Image.open(prediction["drawing"]) as drawn:
        assert drawn.size == (48, 40)
    for found in prediction["boxes"]:
        assert found["class"] in CLASSES and 0.0 <= found["score"] <= 1.0
        x0, y0, x1, y1 = found["box"]
        assert 0 <= x0 <= x1 <= 48 and 0 <= y0 <= y1 <= 40
    top = kdl("predict", shapes_run.name, tmp_path / "wide.jpg", "--top-k", "2", "--runs-dir",
              shapes_run.parent)
    assert top.exit_code == 2 and "--top-k does not apply to a detect run" in top.stderr


@pytest.mark.slow  # 9.5 s: TorchScript compiles torchvision's detector
def test_export_scripts_the_detector_whose_boxes_predict_scales_to_each_input(shapes_run, tmp_path):
    """`kdl export` writes TorchScript only (the other formats refused, saying why); the file,
    given an input resized to the run's 32 px, finds the boxes `kdl predict` prints for that
    input at its own 48x40, scaled by 48/32 and 40/32."""
    runs = shapes_run.parent
    for fmt in ("exported-program", "onnx"):
        refused = kdl("export", shapes_run.name, "--format", fmt, "--runs-dir", runs)
        assert refused.exit_code == 2 and "exports only as torchscript" in refused.stderr
    out = tmp_path / "detector.pt"
    result = kdl("export", shapes_run.name, "--format", "torchscript", "--out", out, "--runs-dir", runs)
    assert result.exit_code == 0, result.stderr
    assert "against the eager model on 8 images" in result.stderr
    metadata = export.read_metadata(out)
    assert metadata["class_names"] == ["background", *CLASSES] and metadata["image_size"] == [32, 32]

    wide = _wide(shapes_run, tmp_path)
    predicted = kdl("predict", shapes_run.name, wide, "--json", "--out", tmp_path / "drawn",
                    "--runs-dir", runs)
    assert predicted.exit_code == 0, predicted.stderr
    (prediction,) = json.loads(predicted.stdout)["predictions"]
    with torch.no_grad():
        (found,) = torch.jit.load(str(out))(BoxInputs(32).batch([wide])[0])
    found = found[found[:, 5] > 0]  # (K, 6): the rows with a detection
    assert len(found) == len(prediction["boxes"]) > 0
    scale = torch.tensor([48 / 32, 40 / 32] * 2)
    for row, box in zip(found, prediction["boxes"], strict=True):
        assert box["class"] == CLASSES[int(row[5]) - 1]
        assert box["score"] == pytest.approx(float(row[4]), abs=1e-4)
        assert box["box"] == pytest.approx((row[:4] * scale).tolist(), abs=0.051)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large"])
def test_retinanet_and_ssdlite_train_evaluate_predict_and_export(shapes_run, tmp_path, model):
    """The other two detectors through the same commands: two steps, scored on val, a prediction,
    an export (their thresholds and resizing set by the model's own keys)."""
    (tmp_path / "shapes").symlink_to(shapes_run.parent.parent / "shapes")
    # plain SGD: no optimizer state in the checkpoints (RetinaNet's with AdamW: 400 MB, each twice)
    result = train_detect(tmp_path, f"model.name={model}", "train.max_steps=2", "optimizer.name=sgd")
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "runs" / result.last_line
    (val,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "val"]
    assert {"map", "map_50", "map_75", "mar_100"} <= val.keys()
    predicted = kdl("predict", run.name, _wide(shapes_run, tmp_path), "--json", "--out", tmp_path / "drawn",
                    "--runs-dir", run.parent)
    assert predicted.exit_code == 0, predicted.stderr
    assert (tmp_path / "drawn" / "wide.png").is_file()
    exported = kdl("export", run.name, "--format", "torchscript", "--runs-dir", run.parent)
    assert exported.exit_code == 0, exported.stderr


def test_coco_json_trains_with_an_image_without_boxes_and_refuses_bad_annotations(shapes_run, tmp_path):
    shapes = tmp_path / "shapes"
    source = shapes_run.parent.parent / "shapes"
    (shapes / "annotations").mkdir(parents=True)
    (shapes / "JPEGImages").symlink_to(source / "JPEGImages")
    train = json.loads((source / "annotations" / "instances_train.json").read_text())
    val = (source / "annotations" / "instances_val.json").read_text()
    (shapes / "annotations" / "instances_val.json").write_text(val)
    path = shapes / "annotations" / "instances_train.json"

    def write(annotations: list[dict]) -> None:
        path.write_text(json.dumps({**train, "annotations": annotations}))

    # image 1 keeps no box: background
    write([a for a in train["annotations"] if a["image_id"] != 1])
    result = train_coco(tmp_path, shapes)
    assert result.exit_code == 0, result.stderr
    summary = read_json(tmp_path / "coco-runs" / result.last_line / "summary.json")
    assert 0.0 <= summary["final"]["val.map"] <= 1.0
    first = dict(train["annotations"][0])
    for bad, said in [({"category_id": 9}, "category_id 9"), ({"bbox": [3, 3, 0, 5]}, "is empty"),
                      ({"bbox": [20, 20, 30, 5]}, "reaches outside its 32x32 image"),
                      ({"bbox": None}, "lacks a usable"), ({"bbox": [1, 2]}, "lacks a usable")]:
        write([{**first, **bad}, *train["annotations"][1:]])
        refused = train_coco(tmp_path, shapes)
        assert refused.exit_code == 2, refused.stderr
        assert str(path) in refused.stderr and said in refused.stderr and "Traceback" not in refused.stderr
    write([{k: v for k, v in first.items() if k != "bbox"}, *train["annotations"][1:]])
    refused = train_coco(tmp_path, shapes)
    assert refused.exit_code == 2 and "lacks a usable 'bbox'" in refused.stderr, refused.stderr


def test_a_voc_box_outside_its_image_names_the_xml_file(tmp_path):
    assert train_detect(tmp_path, "train.max_steps=1").exit_code == 0
    xml = tmp_path / "shapes" / "Annotations" / "train_000003.xml"
    text = xml.read_text()
    start = text.index("<xmax>") + len("<xmax>")
    xml.write_text(text[:start] + "40" + text[text.index("</xmax>"):])
    refused = train_detect(tmp_path, "train.max_steps=1")
    assert refused.exit_code == 2 and str(xml) in refused.stderr and "reaches outside" in refused.stderr


@pytest.mark.slow  # 15 s: the detector trained three times over
def test_stopped_and_resumed_equals_uninterrupted(tmp_path):
    # SGD with momentum (one state a weight), where the config's AdamW keeps two: checkpoints of
    # 152 MB rather than 228 MB, each written and read in full
    overrides = [*TINY, f"data.root={tmp_path / 'shapes'}", "data.augment=[crop,flip]", "data.crop_padding=4",
                 "data.test_images=0", "train.epochs=2", "train.deterministic=true",
                 "train.checkpoint_every_steps=2", "optimizer.name=sgd", "optimizer.momentum=0.9"]
    assert_resumes_after_random_kill(tmp_path, CONFIGS / "shapes_detect.yaml", overrides, seed=5, steps=8)
