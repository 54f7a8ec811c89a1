"""Mistakes kdl used to accept or misname: a dataset of one class (a classifier that learns
nothing, loss 0), an image folder with one empty class among full ones, and a FIFO or a device
where a file should be."""

from __future__ import annotations

import os

import pytest
from datafiles import BLUE, RED, write_csv, write_png
from kdl import CONFIGS, kdl

SHORT = ["--set", "train.epochs=1", "--set", "train.device=cpu"]


def images(root, classes):
    for name, count in classes.items():
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_png(root / "train" / name / f"{i}.png", RED if i % 2 else BLUE)


def test_an_image_folder_of_one_class_is_refused(tmp_path, runs_dir):
    images(tmp_path / "pics", {"cat": 40})
    result = kdl("train", CONFIGS / "my_images_cnn.yaml", *SHORT, "--set", f"data.root={tmp_path / 'pics'}")
    assert result.exit_code == 2
    assert f"{tmp_path / 'pics' / 'train'} has one class folder (cat)" in result.stderr
    assert "two or more" in result.stderr and not runs_dir.exists()


def test_an_image_folder_names_its_empty_class_folders_only(tmp_path, runs_dir):
    images(tmp_path / "pics", {"cat": 20, "dog": 0, "eel": 20})
    result = kdl("train", CONFIGS / "my_images_cnn.yaml", *SHORT, "--set", f"data.root={tmp_path / 'pics'}")
    assert result.exit_code == 2
    assert "without images: dog (1 of 3)" in result.stderr and "cat" not in result.stderr


def test_a_text_file_of_one_label_is_refused(tmp_path, runs_dir):
    texts = write_csv(tmp_path / "texts.csv", ["text", "label"], [[f"text {i}", "spam"] for i in range(40)])
    result = kdl("train", CONFIGS / "my_texts_lstm.yaml", *SHORT, "--set", f"data.train_file={texts}")
    assert result.exit_code == 2
    assert f"every text in {texts} has the label 'spam'" in result.stderr
    assert "data.label_field" in result.stderr and not runs_dir.exists()


@pytest.mark.parametrize("where, what", [("fifo", "a FIFO (named pipe)"), ("/dev/zero", "a device"),
                                         ("folder", "a folder")])
def test_a_fifo_or_a_device_is_called_what_it_is(tmp_path, runs_dir, where, what):
    path = tmp_path / where if not where.startswith("/") else where
    if where == "fifo":
        os.mkfifo(path)
    elif where == "folder":
        path.mkdir()
    text = kdl("train", CONFIGS / "my_text_char_lstm.yaml", *SHORT, "--set", f"data.path={path}")
    assert text.exit_code == 2 and f"{path} is {what}, not a text file" in text.stderr
    config = kdl("train", path)
    assert config.exit_code == 2 and f"config file '{path}' is {what}, not a file" in config.stderr


@pytest.mark.parametrize("options, named", [
    (["--nnodes", "2"], "--nnodes is an option"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes and --node-rank are options"),
    (["--master-addr", "10.0.0.1", "--master-port", "29500"], "--master-addr and --master-port are options"),
])
def test_launch_options_without_nproc_per_node_are_refused(runs_dir, options, named):
    """They used to be ignored: each machine told to train together trained a run of its own."""
    result = kdl("train", CONFIGS / "digits_cnn.yaml", *SHORT, *options)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith(f"error: {named} of a launch through torchrun, which --nproc-per-node N "
                                    "asks for"), result.stderr
    options_named = named.removesuffix(" is an option").removesuffix(" are options")
    assert result.stderr.rstrip().endswith(f"Add --nproc-per-node, or leave out {options_named}")
    assert not runs_dir.exists()


def test_a_node_rank_outside_the_machines_is_refused(runs_dir, monkeypatch):
    """It used to wait ten minutes for a rendezvous that could never complete (here, let through,
    1 s)."""
    from karpathy_runner import launcher

    monkeypatch.setattr(launcher, "MEETING_TIMEOUT_S", 1)
    result = kdl("train", CONFIGS / "digits_cnn.yaml", *SHORT, "--nproc-per-node", "1", "--nnodes", "2",
                 "--node-rank", "2")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: --node-rank 2 with --nnodes 2: the machines are numbered 0 to 1")
    assert not runs_dir.exists()
