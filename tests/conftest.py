"""The tests' layers and shared fixtures.

tests/unit: functions and classes, no subprocess, no training beyond a few steps; tests/e2e: kdl
commands run in-process; tests/reliability: kills, signals, forked and launched processes,
terminal screens, sweeps, searches, torchrun and compiles, marked `slow` here
(`pytest -m "not slow"` runs the other two). The helpers they share are modules of tests/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torchvision.datasets.cifar

RELIABILITY = Path(__file__).parent / "reliability"


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal gives it: a suite started in the background of a shell (`pytest &`
    in a script, whose shell ignores SIGINT for it) would pass the ignored SIGINT on to every
    process its tests start, and the tests of Ctrl-C would find it unheard. Each pytest-xdist
    worker trains with one intra-op thread: several workers, each with torch's default of one
    thread per core, run several times slower on a small machine."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(RELIABILITY):
            item.add_marker(pytest.mark.slow)


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
def run(trained, tmp_path):
    """A private copy of the trained run, marked interrupted so that it can be resumed."""
    folder = tmp_path / "runs" / trained.name
    shutil.copytree(trained, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    return folder


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (stopping.one_thread): runs compared bit for bit use
    the same thread count as the `kdl train` processes of the tests."""
    from stopping import one_thread

    with one_thread():
        yield
