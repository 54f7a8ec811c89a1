"""Bad configs and bad command lines: each exits 2 with one paragraph that names the problem and
the fix, no traceback, and leaves no run folder behind (never one marked running)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from kdl import CONFIGS, kdl

CONFIG = str(CONFIGS / "digits_cnn.yaml")


def setup_files(tmp: Path, runs: Path, run_id: str) -> None:
    (tmp / "empty.yaml").write_text("# nothing here\n")
    (tmp / "list.yaml").write_text("- name: x\n- seed: 1\n")
    (tmp / "scalar.yaml").write_text("just some text\n")
    (tmp / "broken.yaml").write_text("name: x\nmodel: {channels: [8, 16}\n")
    (tmp / "branch.yaml").write_text("name: x\ndata: 3\n")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "empty_mnist").mkdir()
    (tmp / "no_classes" / "train").mkdir(parents=True)
    (tmp / "no_images" / "train" / "cat").mkdir(parents=True)
    for suffix in ("aaa", "aab"):  # two runs that share a prefix
        folder = runs / f"20990101-000000-twins-{suffix}"
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"status": "interrupted", "id": folder.name}))
        shutil.copy(runs / run_id / "config.yaml", folder / "config.yaml")
    damaged = runs / "20990101-000000-damaged-aac"
    shutil.copytree(runs / run_id, damaged)
    (damaged / "meta.json").write_text(json.dumps({"status": "interrupted", "pid": "abc"}))


def mark_running(runs: Path, run_id: str) -> None:
    """The run's process is alive (this one) and it says running."""
    meta_path = runs / run_id / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "status": "running", "pid": os.getpid(),
                                     "pid_started": None}))


# (id, command line, fragments the message must hold: the problem and the fix), {tmp} {runs}
# {run} {config} are filled in; each command gets --runs-dir {runs} unless it names one
CASES = [
    # keys and values
    ("typo key", ["train", "{config}", "--set", "optimizer.lrr=0.1"],
     ["optimizer.lrr: unknown key", "Did you mean 'optimizer.lr'?"]),
    ("typo branch", ["train", "{config}", "--set", "trian.epochs=3"],
     ["trian: unknown key", "Did you mean 'train'?"]),
    ("wrong type", ["train", "{config}", "--set", "data.batch_size=many"],
     ["data.batch_size", "integer", "'many'", "--set data.batch_size=VALUE"]),
    ("list expected", ["train", "{config}", "--set", "model.channels=8"],
     ["model.channels", "list", "--set model.channels=VALUE"]),
    ("negative lr", ["train", "{config}", "--set", "optimizer.lr=-0.1"],
     ["optimizer.lr", "greater than 0", "-0.1", "--set optimizer.lr=VALUE"]),
    ("zero epochs", ["train", "{config}", "--set", "train.epochs=0"],
     ["train.epochs", "greater than or equal to 1"]),
    ("val fraction", ["train", "{config}", "--set", "data.val_fraction=1.5"],
     ["data.val_fraction", "less than 1", "1.5"]),
    ("even kernel", ["train", "{config}", "--set", "model.kernel_size=4"],
     ["model.kernel_size", "must be odd", "4"]),
    ("unknown model", ["train", "{config}", "--set", "model.name=transformer"],
     ["model.name: unknown model 'transformer'", "Valid names: cnn"]),
    ("unknown dataset", ["train", "{config}", "--set", "data.name=imagenet"],
     ["data.name: unknown dataset 'imagenet'", "cifar10", "digits", "image_folder", "mnist"]),
    ("unknown optimizer", ["train", "{config}", "--set", "optimizer.name=lion"],
     ["optimizer.name: unknown optimizer 'lion'", "sgd, adam, adamw, rmsprop"]),
    ("unknown scheduler", ["train", "{config}", "--set", "scheduler.name=linear"],
     ["scheduler.name: unknown scheduler 'linear'", "none, step, cosine, onecycle"]),
    ("unknown augmentation", ["train", "{config}", "--set", "data.augment=[rotate]"],
     ["data.augment", "'rotate'", "'crop'", "'flip'"]),
    ("nesterov without sgd", ["train", "{config}", "--set", "optimizer.nesterov=true"],
     ["optimizer.nesterov", "optimizer.name: sgd", "momentum > 0"]),
    ("device name", ["train", "{config}", "--device", "tpu"],
     ["train.device", "'tpu'", "auto, cpu, cuda, cuda:N, mps"]),
    ("metric name", ["train", "{config}", "--set", "train.best_metric=accuracy"],
     ["train.best_metric", "val.loss or val.accuracy"]),
    ("metric of no task", ["train", "{config}", "--set", "train.best_metric=val.precision"],
     ["'val.precision' is not a metric of the classify task", "val.loss, val.accuracy"]),
    ("no validation split", ["train", "{config}", "--set", "data.val_fraction=0"],
     ["no validation split", "data.val_fraction > 0", "train.best_metric: train.loss"]),
    ("val within epochs, no val split", ["train", "{config}", "--set", "data.val_fraction=0", "--set",
                                         "train.best_metric=train.loss", "--set", "train.eval_every_steps=5"],
     ["train.eval_every_steps is 5 but there is no validation split", "train.eval_every_steps: null"]),
    ("run name with a slash", ["train", "{config}", "--name", "a/b"],
     ["name", "no '/'", "'a/b'"]),
    # data and hardware
    ("missing data folder", ["train", "{config}", "--set", "data.name=cifar10", "--set",
                             "data.download=false", "--set", "data.root={tmp}/nothing"],
     ["{tmp}/nothing", "data.download: true", "data.root"]),
    ("download false, no files", ["train", "{config}", "--set", "data.name=mnist", "--set",
                                  "data.download=false", "--set", "data.root={tmp}/empty_mnist"],
     ["dataset 'mnist' not found", "{tmp}/empty_mnist", "data.download: true"]),
    ("image folder missing", ["train", "{config}", "--set", "data.name=image_folder", "--set",
                              "data.root={tmp}/photos"],
     ["{tmp}/photos", "does not exist", "train/"]),
    ("image folder without classes", ["train", "{config}", "--set", "data.name=image_folder", "--set",
                                      "data.root={tmp}/no_classes"],
     ["{tmp}/no_classes/train has no class folders", "ROOT/train/<class>/<image>"]),
    ("image folder without images", ["train", "{config}", "--set", "data.name=image_folder", "--set",
                                     "data.root={tmp}/no_images"],
     ["no images in {tmp}/no_images/train", "ROOT/train/<class>/<image>"]),
    ("cuda without a gpu", ["train", "{config}", "--device", "cuda"],
     ["'cuda' asked for a CUDA GPU but torch sees none", "--device cpu"]),
    ("fp16 on the cpu", ["train", "{config}", "--device", "cpu", "--set", "train.precision=fp16"],
     ["fp16 needs a GPU", "--set train.precision=bf16"]),
    ("batch larger than the data", ["train", "{config}", "--set", "data.batch_size=5000"],
     ["data.batch_size is 5000", "only 1294", "at most 1294"]),
    ("runs folder under a file", ["train", "{config}", "--runs-dir", "{tmp}/a_file/runs"],
     ["cannot create the runs folder {tmp}/a_file/runs", "--runs-dir"]),
    # --set itself
    ("--set without =", ["train", "{config}", "--set", "optimizer.lr"],
     ["--set 'optimizer.lr' is malformed", "--set key.sub=value"]),
    ("--set without a key", ["train", "{config}", "--set", "=3"], ["malformed", "--set key.sub=value"]),
    ("--set with an empty part", ["train", "{config}", "--set", "optimizer..lr=1"], ["malformed"]),
    ("--set bad YAML value", ["train", "{config}", "--set", "model.channels=[8, 16"],
     ["not a valid YAML", "[8, 16"]),
    ("--set into a value", ["validate", "{config}", "--set", "seed.x=1"],
     ["'seed' is a value, not a branch"]),
    # config files
    ("config file missing", ["train", "{tmp}/nope.yaml"],
     ["{tmp}/nope.yaml", "does not exist", "configs/digits_cnn.yaml"]),
    ("empty YAML", ["train", "{tmp}/empty.yaml"], ["empty.yaml is empty", "configs/digits_cnn.yaml"]),
    ("YAML that is a list", ["train", "{tmp}/list.yaml"],
     ["list.yaml holds a list, not a mapping of keys"]),
    ("YAML that is text", ["validate", "{tmp}/scalar.yaml"], ["holds a str, not a mapping"]),
    ("YAML syntax error", ["train", "{tmp}/broken.yaml"], ["not valid YAML at line 2", "Fix the file"]),
    ("branch that is a value", ["train", "{tmp}/branch.yaml"], ["data", "mapping", "3"]),
    # the command line
    ("no config, no resume", ["train"], ["give a CONFIG file", "--resume RUN"]),
    ("config and resume", ["train", "{config}", "--resume", "{run}"], ["not both"]),
    ("validate without a config", ["validate"], ["give a CONFIG file to validate", "--reference"]),
    ("validate a config and --reference", ["validate", "{config}", "--reference"], ["not both"]),
    ("unknown option", ["train", "{config}", "--epochs", "3"], ["No such option: --epochs"]),
    ("unknown RUN", ["train", "--resume", "nope"], ["no run 'nope'", "kdl runs"]),
    ("ambiguous prefix", ["eval", "20990101-000000-twins-a"],
     ["ambiguous", "twins-aaa", "twins-aab", "give more of the id"]),
    ("RUN outside the runs folder", ["eval", "{tmp}"], ["is not a run folder", "kdl runs"]),
    ("resume with changes", ["train", "--resume", "{run}", "--set", "train.epochs=5"],
     ["train.epochs: 1 -> 5", "--allow-changes"]),
    ("resume a completed run", ["train", "--resume", "{run}"],
     ["already completed", "--set train.epochs=N --allow-changes"]),
    ("resume a running run", ["train", "--resume", "{run}"], ["is still running", "stop it first"]),
    ("resume a damaged run", ["train", "--resume", "20990101-000000-damaged-aac"],
     ["is damaged", "meta.json 'pid' is 'abc', not an integer", "kdl rm"]),
    ("grid value", ["sweep", "{config}", "--grid", "optimizer.lr=0.1,abc"],
     ["--grid: the point optimizer.lr=abc is not a valid config", "Fix --grid optimizer.lr"]),
    ("grid key", ["sweep", "{config}", "--grid", "optimizer.lrr=0.1"],
     ["optimizer.lrr: unknown key", "Did you mean 'optimizer.lr'?", "Fix --grid optimizer.lrr"]),
    ("eval checkpoint name", ["eval", "{run}", "--checkpoint", "middle"],
     ["--checkpoint must be best or last"]),
    ("eval split name", ["eval", "{run}", "--split", "train"], ["--split must be val or test"]),
    ("eval a run without checkpoints", ["eval", "20990101-000000-twins-aab"],
     ["no checkpoints/best.pt", "end of each epoch"]),
]


def snapshot(runs: Path) -> dict[str, str]:
    return {p.name: json.loads((p / "meta.json").read_text()).get("status")
            for p in runs.iterdir() if (p / "meta.json").is_file()} if runs.is_dir() else {}


@pytest.mark.parametrize("name, command, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_the_problem_and_the_fix(trained, tmp_path, name, command, fragments):
    if name == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs / trained.name)
    setup_files(tmp_path, runs, trained.name)
    if name == "resume a running run":
        mark_running(runs, trained.name)
    else:  # completed, except where the case is about that
        assert name == "resume a completed run" or snapshot(runs)[trained.name] == "completed"
    fill = {"tmp": str(tmp_path), "runs": str(runs), "run": trained.name, "config": CONFIG}
    args = [part.format(**fill) for part in command]
    if "--runs-dir" not in args and args[0] != "validate":
        args += ["--runs-dir", str(runs)]
    before = snapshot(runs)
    config_before = (runs / trained.name / "config.yaml").read_text()

    result = kdl(*args)

    assert result.exit_code == 2, (result.stdout, result.stderr)
    message = result.stderr
    for fragment in fragments:
        assert fragment.format(**fill) in message, (fragment, message)
    assert "Traceback" not in message + result.stdout
    assert result.stdout == ""  # stdout is for results only
    after = snapshot(runs)
    assert after == before, "a run folder was left behind or changed its status"
    if name != "resume a running run":
        assert "running" not in after.values()
    assert (runs / trained.name / "config.yaml").read_text() == config_before
    assert not (tmp_path / "a_file" / "runs").exists()


def test_messages_say_each_thing_once_and_point_at_the_right_option(tmp_path):
    for folder in ("no_classes/train", "no_images/train/cat"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("no_classes", "no_images"):
        result = kdl("train", CONFIG, "--set", "data.name=image_folder", "--set",
                     f"data.root={tmp_path / folder}", "--runs-dir", tmp_path / "runs")
        assert result.exit_code == 2 and result.stderr.count(str(tmp_path / folder)) == 1, result.stderr
    grid = kdl("sweep", CONFIG, "--grid", "optimizer.lr=0.1,abc", "--runs-dir", tmp_path / "runs")
    assert grid.exit_code == 2 and "--set" not in grid.stderr, grid.stderr


def test_a_cuda_build_without_a_gpu_is_not_told_to_install_one(monkeypatch):
    from karpathy_runner.build import resolve_device
    from karpathy_runner.errors import KdlError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(KdlError) as built_for_cuda:
        resolve_device("cuda")
    assert "built for CUDA 13.0" in str(built_for_cuda.value) and "nvidia-smi" in str(built_for_cuda.value)
    assert "install a CUDA build" not in str(built_for_cuda.value)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(KdlError) as cpu_only:
        resolve_device("cuda")
    assert "built for the CPU only" in str(cpu_only.value) and "install a CUDA build" in str(cpu_only.value)


def test_a_missing_split_names_where_it_was_looked_for(tmp_path):
    from karpathy_runner.config.loading import resolve

    folder = resolve({"data": {"name": "image_folder", "root": str(tmp_path)}}).data
    assert f"there is no {tmp_path / 'test'} (<class>/<image> inside)" in folder.missing_split("test")
    digits = resolve({"data": {"name": "digits", "val_fraction": 0}}).data
    assert "data.val_fraction is 0" in digits.missing_split("val")


def test_a_channel_that_never_varies_is_not_divided_by_zero():
    from karpathy_runner.data.image_sets import TensorImages, channel_stats

    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    images[:, 0] = torch.arange(8, dtype=torch.uint8).view(8, 1, 1) * 30  # only red varies
    mean, std = channel_stats(TensorImages(images, torch.zeros(8, dtype=torch.int64)))
    assert std[0] > 0.1 and std[1] == std[2] == 0.001


@pytest.mark.parametrize("host", ["../elsewhere", "a b", "-a", "x" * 101])
def test_a_machine_name_kdl_cannot_use_is_refused_by_every_command(runs_dir, monkeypatch, host):
    monkeypatch.setenv("KDL_HOST", host)  # it names a folder of the runs folder, too
    for command in (["runs"], ["train", CONFIG, "--set", "train.max_steps=1"]):
        result = kdl(*command)
        assert result.exit_code == 2 and "Traceback" not in result.stderr
        assert f"KDL_HOST={host!r} is not a machine name" in result.stderr and "unset it" in result.stderr
    assert not runs_dir.exists()


def test_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
