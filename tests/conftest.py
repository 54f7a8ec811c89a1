"""Shared fixtures: a runs folder per test, and torchvision's md5 check skipped for test files."""

from __future__ import annotations

import os

import pytest
import torchvision.datasets.cifar


@pytest.fixture
def skip_md5(monkeypatch):
    """Our files are not the published ones: keep torchvision's file check, drop its md5 part."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    monkeypatch.setenv("KDL_RUNS_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The folder of a completed one-epoch tiny digits run, shared by a test module."""
    from kdl import train_tiny

    runs = tmp_path_factory.mktemp("runs")
    result = train_tiny(runs, "--set", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    return runs / result.last_line


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (stopping.one_thread): runs compared bit for bit use
    the same thread count as the `kdl train` processes of the tests."""
    from stopping import one_thread

    with one_thread():
        yield
