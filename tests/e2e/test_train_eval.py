"""A tiny real run end to end: the run-folder contract, eval, `kdl runs`, `kdl show`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from datafiles import write_cifar10, write_mnist
from kdl import kdl, train_tiny

from karpathy_runner.config.loading import load_config
from karpathy_runner.runfolder.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One completed tiny digits run shared by the tests of this module."""
    runs = tmp_path_factory.mktemp("runs")
    result = train_tiny(runs)
    assert result.exit_code == 0, result.stderr
    return runs, result


def test_stdout_holds_only_the_run_id(finished):
    runs, result = finished
    assert result.stdout.strip().splitlines() == [result.last_line]
    assert (runs / result.last_line).is_dir()


def test_run_folder_contract(finished):
    runs, result = finished
    folder = runs / result.last_line
    assert result.last_line.split("-")[2] == "digits_cnn"
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "summary.json", "train.log",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (folder / name).is_file(), name

    # config.yaml is the resolved config and re-runs as it is
    cfg = load_config(folder / "config.yaml")
    assert cfg.model.channels == [8, 16] and cfg.train.epochs == 2
    assert (folder / "config.yaml").read_text().startswith("# kdl train ")

    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "completed"
    for key in ("python", "host", "command", "config_hash", "device", "started_at", "ended_at"):
        assert meta[key] is not None, key
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["config_hash"] == cfg.hash()
    assert meta["epochs_done"] == 2 and meta["device"] == "cpu"

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    splits = [r["split"] for r in records]
    assert splits.count("val") == 2 and splits.count("train_epoch") == 2
    train = [r for r in records if r["split"] == "train"]
    assert all({"step", "epoch", "loss", "accuracy", "lr", "samples_per_s", "time"} <= r.keys()
               for r in train)
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert summary["best"]["metric"] == "val.loss"
    assert summary["final"]["val.accuracy"] > 0.3  # two tiny epochs already learn something

    state = load_checkpoint(folder / "checkpoints" / "last.pt")
    assert state["loop"]["epoch"] == 2 and set(state["models"]) == {"model"}
    log = (folder / "train.log").read_text()
    assert "epoch 2/2" in log and "run completed" in log


def test_eval_writes_json_with_per_class_accuracy_and_confusion(finished):
    runs, result = finished
    out = kdl("eval", "latest", "--split", "test", "--runs-dir", runs, "--json")
    assert out.exit_code == 0, out.stderr
    report = json.loads(out.stdout)
    metrics = report["metrics"]
    confusion = metrics["confusion_matrix"]
    assert len(confusion) == 10 and sum(map(sum, confusion)) == report["samples"] == 359
    correct = sum(confusion[i][i] for i in range(10))
    assert metrics["accuracy"] == pytest.approx(correct / 359)
    assert len(metrics["per_class_accuracy"]) == 10
    saved = json.loads((runs / result.last_line / "eval" / "best-test.json").read_text())
    assert saved["metrics"]["accuracy"] == metrics["accuracy"]

    table = kdl("eval", result.last_line[:12], "--checkpoint", "last", "--runs-dir", runs)
    assert table.exit_code == 0 and "per-class accuracy" in table.stdout
    assert (runs / result.last_line / "eval" / "last-val.json").is_file()


def test_runs_and_show(finished):
    runs, result = finished
    listing = kdl("runs", "--runs-dir", runs)
    assert listing.exit_code == 0
    assert result.last_line in listing.stdout and "completed" in listing.stdout
    rows = json.loads(kdl("runs", "--runs-dir", runs, "--json").stdout)
    assert rows[0]["id"] == result.last_line and rows[0]["epochs_done"] == 2
    assert rows[0]["best_metric"] == "val.loss" and rows[0]["model"] == "cnn"

    shown = kdl("show", "latest", "--runs-dir", runs)
    assert shown.exit_code == 0
    for text in ("config", "environment", "metrics per epoch", "val.accuracy", "torch"):
        assert text in shown.stdout


@pytest.mark.parametrize("ref, message", [("nope", "no run 'nope'"), ("../x", "not a run folder")])
def test_unknown_run_is_a_clear_error(finished, ref, message):
    runs, _ = finished
    result = kdl("show", ref, "--runs-dir", runs)
    assert result.exit_code == 2 and message in result.stderr


def test_eval_of_a_split_the_data_lacks_says_how_to_get_one(tmp_path):
    """The data family says why the split is missing (here: no val held out)."""
    result = train_tiny(tmp_path, "--set", "data.val_fraction=0", "--set", "train.best_metric=train.loss",
                        "--set", "train.max_steps=2")
    assert result.exit_code == 0, result.stderr
    missing = kdl("eval", result.last_line, "--split", "val", "--runs-dir", tmp_path)
    assert missing.exit_code == 2 and "Traceback" not in missing.stderr
    assert ("has no val split: data.val_fraction is 0; train a run with data.val_fraction > 0"
            in missing.stderr)


def test_ambiguous_prefix_is_an_error(tmp_path):
    for suffix in ("aaa", "aab"):
        (tmp_path / f"2026-x-{suffix}").mkdir()
        (tmp_path / f"2026-x-{suffix}" / "meta.json").write_text("{}")
    result = kdl("show", "2026-x-a", "--runs-dir", tmp_path)
    assert result.exit_code == 2 and "ambiguous" in result.stderr


def test_a_run_is_found_by_its_name_when_no_other_has_it(tmp_path):
    live = train_tiny(tmp_path, "--set", "train.max_steps=2", "--name", "live")
    assert live.exit_code == 0, live.stderr
    shown = kdl("show", "live", "--runs-dir", tmp_path)
    assert shown.exit_code == 0 and live.last_line in shown.stdout
    again = train_tiny(tmp_path, "--set", "train.max_steps=3", "--name", "live")
    both = kdl("show", "live", "--runs-dir", tmp_path)
    assert both.exit_code == 2 and "2 runs in" in both.stderr and "are named 'live'" in both.stderr
    assert live.last_line in both.stderr and again.last_line in both.stderr


def test_cuda_without_a_gpu_is_an_error_not_a_cpu_run(runs_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = train_tiny(runs_dir, "--device", "cuda")
    assert result.exit_code == 2 and "CUDA" in result.stderr
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_cifar10_files_train_end_to_end(tmp_path, skip_md5):
    """The seed experiment's pipeline on cifar-10-batches-py files in the real format."""
    write_cifar10(tmp_path / "data", per_batch=20)
    result = train_tiny(tmp_path / "runs", "--set", f"data.root={tmp_path / 'data'}",
                       "--set", "data.name=cifar10", "--set", "data.download=false",
                       "--set", "data.augment=[crop, flip]", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "runs" / result.last_line / "meta.json").read_text())
    assert meta["dataset"] == "cifar10" and meta["status"] == "completed"


def test_mnist_idx_files_train_end_to_end(tmp_path):
    write_mnist(tmp_path / "data", "MNIST", num_train=40, num_test=10)
    result = train_tiny(tmp_path / "runs", "--set", f"data.root={tmp_path / 'data'}",
                       "--set", "data.name=mnist", "--set", "data.download=false",
                       "--set", "data.batch_size=16", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    out = kdl("eval", "latest", "--split", "test", "--runs-dir", tmp_path / "runs", "--json")
    assert json.loads(out.stdout)["samples"] == 10


def test_missing_data_leaves_no_run_folder(tmp_path):
    result = train_tiny(tmp_path / "runs", "--set", f"data.root={tmp_path / 'nothing'}",
                       "--set", "data.name=cifar10", "--set", "data.download=false")
    assert result.exit_code == 2 and str(tmp_path / "nothing") in result.stderr
    assert not (tmp_path / "runs").exists()


def test_batch_larger_than_the_dataset(tmp_path):
    result = train_tiny(tmp_path / "runs", "--set", "data.batch_size=5000")
    assert result.exit_code == 2 and "data.batch_size" in result.stderr


def test_early_stopping_stops_and_says_why(tmp_path):
    result = train_tiny(tmp_path / "runs", "--set", "train.epochs=6",
                       "--set", "optimizer.lr=1e-9", "--set", "train.early_stopping.patience=1",
                       "--set", "train.early_stopping.min_delta=0.5")
    assert result.exit_code == 0
    summary = json.loads((tmp_path / "runs" / result.last_line / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and summary["epochs_done"] == 2


def test_resolved_config_reruns(finished, tmp_path):
    runs, result = finished
    config = runs / result.last_line / "config.yaml"
    again = kdl("train", config, "--runs-dir", tmp_path, "--quiet", "--set", "train.max_steps=3")
    assert again.exit_code == 0, again.stderr
    assert yaml.safe_load(config.read_text())["model"]["channels"] == [8, 16]
