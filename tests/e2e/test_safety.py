"""Safety: checkpoints load with weights_only=True, YAML loads safely, RUN arguments stay inside the
runs folder unless they name a real run folder, and unsafe library versions are refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from kdl import CONFIGS, ROOT, kdl

from karpathy_runner import build


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def status(folder: Path) -> str:
    return json.loads((folder / "meta.json").read_text())["status"]


def poison_checkpoint(folder: Path, marker: Path) -> None:
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    state["models"]["model"] = Payload(marker)
    for name in ("last", "best"):
        torch.save(state, folder / "checkpoints" / f"{name}.pt")
    marker.unlink(missing_ok=True)


@pytest.mark.parametrize("command", [["eval", "{id}", "--checkpoint", "last"], ["train", "--resume", "{id}"]])
def test_a_checkpoint_that_would_run_code_is_refused(run, tmp_path, command):
    marker = tmp_path / "pwned"
    poison_checkpoint(run, marker)
    result = kdl(*[a.format(id=run.name) for a in command], "--runs-dir", run.parent)
    assert result.exit_code == 2
    assert "refused to load" in result.stderr and "untrusted" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert status(run) == "interrupted"  # the run is as it was


def test_a_damaged_checkpoint_is_a_clear_error(run):
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: 1000])
    result = kdl("eval", run.name, "--checkpoint", "last", "--runs-dir", run.parent)
    assert result.exit_code == 2 and "damaged or incomplete" in result.stderr
    assert "--checkpoint" in result.stderr


def test_a_checkpoint_of_another_model_is_a_clear_error(run):
    """--allow-changes cannot change the model under a checkpoint; the run stays as it was."""
    before = (run / "config.yaml").read_text()
    result = kdl("train", "--resume", run.name, "--set", "model.channels=[4,4]", "--allow-changes",
                 "--runs-dir", run.parent)
    assert result.exit_code == 2 and "does not fit" in result.stderr and "model." in result.stderr
    assert "Traceback" not in result.stderr
    assert (run / "config.yaml").read_text() == before and status(run) == "interrupted"


YAML_ATTACK = "name: x\ndata: !!python/object/apply:os.system ['touch {marker}']\n"


def test_config_yaml_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(YAML_ATTACK.format(marker=marker))
    for command in (["validate", config], ["train", config, "--runs-dir", tmp_path / "runs"]):
        result = kdl(*command)
        assert result.exit_code == 2, command
        assert "not valid YAML" in result.stderr and "python tags are refused" in result.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["eval", "{id}"], ["train", "--resume", "{id}"]])
def test_a_run_config_with_a_python_tag_is_refused(run, tmp_path, command):
    """A tampered config.yaml inside a run is an error, never the defaults."""
    marker = tmp_path / "pwned"
    (run / "config.yaml").write_text(YAML_ATTACK.format(marker=marker))
    result = kdl(*[a.format(id=run.name) for a in command], "--runs-dir", run.parent)
    assert result.exit_code == 2 and "python tags are refused" in result.stderr
    assert not marker.exists() and status(run) == "interrupted"


# ----------------------------------------------------------------------------- RUN arguments


def test_run_arguments_stay_inside_the_runs_folder(run, tmp_path, monkeypatch):
    runs = run.parent
    monkeypatch.chdir(runs)  # so that ../victim is the folder beside it
    victim = tmp_path / "victim"  # a folder beside the runs folder that is not a run
    victim.mkdir()
    (victim / "meta.json").write_text("{}")  # even with a meta.json: no config.yaml, no run
    for ref in ("../victim", str(victim), "victim", "a/b", "..", ".", "../runs/../victim"):
        for command in (["show", ref], ["rm", ref, "--yes"], ["eval", ref]):
            result = kdl(*command, "--runs-dir", runs)
            assert result.exit_code == 2, (command, result.stdout)
            assert "Traceback" not in result.stderr
    assert victim.is_dir() and (victim / "meta.json").is_file()


def test_a_real_run_folder_is_accepted_by_path(run, tmp_path, monkeypatch):
    monkeypatch.chdir(run.parent.parent)
    for ref in (str(run), f"runs/{run.name}", f"./runs/{run.name}/"):
        shown = kdl("show", ref, "--runs-dir", tmp_path / "elsewhere")
        assert shown.exit_code == 0 and run.name in shown.stdout, ref


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize("package, old", [("torch", "2.5.1"), ("torchvision", "0.20.1")])
def test_library_versions_too_old_for_safe_loading_are_refused(run, tmp_path, monkeypatch, package, old):
    real = build.package_version
    monkeypatch.setattr(build, "package_version", lambda name: old if name == package else real(name))
    fresh = kdl("train", CONFIGS / "digits_cnn.yaml", "--runs-dir", tmp_path / "new")
    assert fresh.exit_code == 2 and f"{package} {old} is too old" in fresh.stderr
    assert not (tmp_path / "new").exists()
    # eval refuses before it unpickles anything
    marker = tmp_path / "pwned"
    poison_checkpoint(run, marker)
    evaluated = kdl("eval", run.name, "--runs-dir", run.parent)
    assert evaluated.exit_code == 2 and "too old" in evaluated.stderr and not marker.exists()


def test_python_older_than_the_supported_ones_cannot_install():
    """pip refuses to install kdl on a Python older than 3.10, and pulls torch >= 2.6."""
    project = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3\.10"$', project, re.MULTILINE)
    assert '"torch>=2.6"' in project and '"torchvision>=0.21"' in project
