"""Every command kdl prints for a next step works when it is run as printed: the end of a run's
next steps (an evaluation only where one can run, a sample where the task draws), and the resume
line of an interrupted run; where a command would not find the run by itself, they name its runs
folder."""

from __future__ import annotations

import re
import shlex

import pytest
import stopping
import yaml
from kdl import CONFIGS, TINY, kdl

NEXT_STEP = re.compile(r"^(?:test it|evaluate|sample it|inspect):\s+(kdl .+)$", re.M)
RESUME = re.compile(r"resume with `(kdl train --resume [^`]+)`")

pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


def run_as_printed(command: str):
    """A printed `kdl ...` command, run as a shell would split it (in-process; the runs folder
    is the one KDL_RUNS_DIR names, as a user's)."""
    return kdl(*shlex.split(command)[1:])


def configs(tmp_path) -> dict[str, list[str]]:
    """Tiny runs of three kinds: digits (a test split), a character corpus (val, no test), and a
    GAN (whose eval needs a classifier, none at hand here)."""
    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def add_{i}(a, b):\n    return a + b * {i}\n\n" for i in range(120)))
    chars = tmp_path / "chars.yaml"
    chars.write_text(yaml.safe_dump({
        "name": "tiny_lm", "data": {"name": "char_text", "path": str(corpus), "seq_len": 20,
                                    "batch_size": 8, "val_fraction": 0.2},
        "model": {"name": "lstm", "embedding_size": 8, "hidden_size": 16, "layers": 1},
        "task": {"sample_length": 0}, "train": {"epochs": 1, "device": "cpu"}}))
    gan = tmp_path / "gan.yaml"
    gan.write_text(yaml.safe_dump({
        "name": "tiny_gan", "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "gan", "latent_size": 8, "width": 8}, "train": {"epochs": 1, "device": "cpu"}}))
    return {"digits": [str(CONFIGS / "digits_cnn.yaml"), *stopping.sets([*TINY, "train.epochs=1"])],
            "chars": [str(chars)], "gan": [str(gan)]}


@pytest.mark.parametrize("kind, expected", [
    ("digits", ["kdl eval {id} --split test", "kdl show {id}"]),
    ("chars", ["kdl eval {id}", "kdl sample {id}", "kdl show {id}"]),
    ("gan", ["kdl sample {id}", "kdl show {id}"]),
])
def test_the_next_steps_a_run_prints_work_as_printed(runs_dir, tmp_path, monkeypatch, kind, expected):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception-v3 weights cached
    result = kdl("train", *configs(tmp_path)[kind])
    assert result.exit_code == 0, result.stderr
    steps = NEXT_STEP.findall(result.stderr)
    assert steps == [step.format(id=result.last_line) for step in expected]
    for step in steps:
        ran = run_as_printed(step)
        assert ran.exit_code == 0, (step, ran.stderr)


def test_the_resume_line_of_an_interrupted_run_works_as_printed(runs_dir, monkeypatch):
    stopping.signal_at(monkeypatch, [5])
    stopped = kdl("train", CONFIGS / "digits_cnn.yaml", *stopping.sets(TINY))
    assert stopped.exit_code == 130
    (command,) = RESUME.findall(stopped.stderr)
    resumed = run_as_printed(command)
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.last_line == stopped.last_line


def test_the_hints_of_a_run_in_another_runs_folder_name_it(runs_dir, tmp_path, monkeypatch):
    """A run trained with --runs-dir elsewhere than the runs folder a command finds by itself
    (KDL_RUNS_DIR's, here) prints hints that name its folder, quoted for the shell, and they work
    as printed. A run in the folder a command finds anyway keeps them short."""
    elsewhere, digits = tmp_path / "other runs", configs(tmp_path)["digits"]
    stopping.signal_at(monkeypatch, [5])
    stopped = kdl("train", *digits, "--runs-dir", elsewhere)
    assert stopped.exit_code == 130
    run = stopped.last_line
    (command,) = RESUME.findall(stopped.stderr)
    assert command == f"kdl train --resume {run} --runs-dir '{elsewhere}'"
    resumed = run_as_printed(command)
    assert resumed.exit_code == 0, resumed.stderr
    steps = NEXT_STEP.findall(resumed.stderr)
    assert steps == [f"kdl eval {run} --runs-dir '{elsewhere}' --split test",
                     f"kdl show {run} --runs-dir '{elsewhere}'"]
    for step in steps:
        ran = run_as_printed(step)
        assert ran.exit_code == 0, (step, ran.stderr)
    here = kdl("train", *digits, "--runs-dir", runs_dir)
    assert NEXT_STEP.findall(here.stderr) == [f"kdl eval {here.last_line} --split test",
                                              f"kdl show {here.last_line}"]
