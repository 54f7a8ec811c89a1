"""What `kdl` says about itself: --version, usage lines, and how it ends when its reader leaves."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kdl import kdl
from runfolders import make_run

import karpathy_runner


def test_version_names_kdl_python_and_torch():
    result = kdl("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"kdl {karpathy_runner.__version__} (python 3.")
    assert ", torch 2." in result.stdout


@pytest.mark.parametrize(("command", "usage"), [
    ("eval", "kdl eval [OPTIONS] RUN"),
    ("show", "kdl show [OPTIONS] RUN"),
    ("sample", "kdl sample [OPTIONS] RUN"),
    ("rm", "kdl rm [OPTIONS] RUN..."),
    ("plot", "kdl plot [OPTIONS] [RUN...]"),  # or --sweep ID
    ("compare", "kdl compare [OPTIONS] [RUN...]"),
    ("sweep", "kdl sweep [OPTIONS] CONFIG"),
    ("validate", "kdl validate [OPTIONS] [CONFIG]"),  # or --reference
    ("train", "kdl train [OPTIONS] [CONFIG]"),
])
def test_usage_lines_read_as_people_write_them(command, usage):
    first = kdl(command, "--help").stdout.splitlines()[0]
    assert first == f"Usage: {usage}"


@pytest.mark.parametrize("command", [["runs"], ["show", "latest"], ["compare", "latest", "latest"],
                                     ["runs", "--json"]])
def test_a_reader_that_leaves_early_ends_the_command_quietly(runs_dir, command):
    """`kdl show latest | head -1`: exit 141 as a Unix tool killed by SIGPIPE, nothing on stderr."""
    make_run(runs_dir, [0.9, 0.5])
    process = subprocess.Popen([sys.executable, "-m", "karpathy_runner", *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, stderr
    assert stderr == ""
