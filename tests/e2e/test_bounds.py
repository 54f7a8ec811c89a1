"""Bounded resources: text samples stream as they are drawn and absurd lengths are refused; image
samples are drawn in batches and never more than one grid holds; more training processes than
the machine has cores or memory for are refused unless --force."""

from __future__ import annotations

import importlib
import os

import pytest
from kdl import CONFIGS, kdl
from test_gan import gan_yaml, train  # noqa: F401 (gan_yaml: a fixture)
from test_language_model import corpus, lm_config  # noqa: F401 (corpus: a fixture)
from test_language_model import train as train_lm

from karpathy_runner.evaluate import sample_run
from karpathy_runner.tasks import SampleRequest, drawing, language_model
from karpathy_runner.tasks import gan as gan_task
from karpathy_runner.ui.pictures import grid_capacity, grid_shape

cli_app = importlib.import_module("karpathy_runner.cli.app")  # (the package's `app` is the Typer app)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_text_streams_as_it_is_drawn_and_absurd_lengths_are_refused(tmp_path, corpus,  # noqa: F811
                                                                    monkeypatch):
    result = train_lm(tmp_path / "runs", *lm_config(tmp_path, corpus, "train.epochs=1"))
    assert result.exit_code == 0, result.stderr
    pieces: list[str] = []
    request = SampleRequest(seed=3, length=600, prime="def ", stream=pieces.append)
    drawn, _ = sample_run(tmp_path / "runs", result.last_line, request, device="cpu")
    every = language_model.STREAM_EVERY
    assert [len(p) for p in pieces] == [4, every, every, 600 - 2 * every]  # the prime first
    assert "".join(pieces) == drawn.text and len(drawn.text) == 604
    printed = kdl("sample", result.last_line, "--seed", "3", "--length", "600", "--prime", "def ",
                  "--runs-dir", tmp_path / "runs")
    assert printed.exit_code == 0 and printed.stdout == drawn.text + "\n"

    assert language_model.MAX_SAMPLE_LENGTH == 10_000_000
    monkeypatch.setattr(language_model, "MAX_SAMPLE_LENGTH", 1000)  # (a failure fails fast)
    too_long = language_model.MAX_SAMPLE_LENGTH + 1
    refused = kdl("sample", result.last_line, "--length", too_long, "--runs-dir", tmp_path / "runs")
    assert refused.exit_code == 2 and "--length" in refused.stderr and "Traceback" not in refused.stderr
    assert refused.stdout == ""


def test_images_are_drawn_in_batches_and_at_most_a_grid(tmp_path, gan_yaml, monkeypatch):  # noqa: F811
    result = train(tmp_path / "runs", gan_yaml, "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    drawn: list[int] = []
    generate = gan_task.GAN.generate
    monkeypatch.setattr(drawing, "SAMPLE_BATCH", 4)
    monkeypatch.setattr(gan_task.GAN, "generate",
                        lambda self, noise: drawn.append(len(noise)) or generate(self, noise))
    out = tmp_path / "nine.png"
    sampled = kdl("sample", result.last_line, "-n", "9", "--out", out, "--runs-dir", tmp_path / "runs")
    assert sampled.exit_code == 0, sampled.stderr
    assert drawn == [4, 4, 1]

    most = grid_capacity(8, 8)  # digits: 8x8
    rows, columns = grid_shape(most, 8, 8)
    assert rows * columns <= 89_478_485 < (lambda h, w: h * w)(*grid_shape(most + 1, 8, 8))
    refused = kdl("sample", result.last_line, "-n", most + 1, "--runs-dir", tmp_path / "runs")
    assert refused.exit_code == 2 and f"{most:,}" in refused.stderr
    assert "Traceback" not in refused.stderr and drawn == [4, 4, 1]  # refused before drawing


@pytest.mark.parametrize("command", [
    ["sweep", CONFIGS / "digits_cnn.yaml", "--grid", "seed=0,1", "--jobs", "{n}"],
    ["sweep", CONFIGS / "digits_cnn.yaml", "--space", "optimizer.lr=loguniform(1e-3,1e-1)",
     "--trials", "2", "--jobs", "{n}"],
    ["train", CONFIGS / "digits_cnn.yaml", "--nproc-per-node", "{n}"],
])
def test_more_processes_than_cores_or_memory_are_refused(runs_dir, monkeypatch, command):
    option = command[-2]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    refused = kdl(*[str(a).format(n=3) for a in command])
    assert refused.exit_code == 2, refused.stderr
    assert f"{option} 3: this machine gives kdl 2 CPU cores" in refused.stderr
    assert f"{option} 2 or fewer" in refused.stderr and "--force" in refused.stderr
    assert not runs_dir.exists()  # nothing started

    monkeypatch.setattr(cli_app, "_available_memory", lambda: 1 * 2**30)  # 1 GiB free: one process
    refused = kdl(*[str(a).format(n=2) for a in command])
    assert refused.exit_code == 2 and "1.0 GiB is free" in refused.stderr, refused.stderr
    assert f"{option} 1 or fewer" in refused.stderr


def test_force_starts_them_anyway(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(Exception, match="--jobs 2"):
        cli_app.check_processes(2, "--jobs", force=False)
    cli_app.check_processes(2, "--jobs", force=True)
    cli_app.check_processes(1, "--jobs", force=False)  # one process always may
