"""Writes never go through or over what is not kdl's: a file named by --out is a regular file
replaced atomically or a new one, anything else is refused; inside a run folder nothing is
written through a symlink; `kdl rm` removes only kdl runs in the runs folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from kdl import CONFIGS, TINY, kdl, train_tiny

from karpathy_runner.config.loading import load_config
from karpathy_runner.errors import KdlError
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.tasks import Sample


def refused(result, *names) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    for name in names:
        assert str(name) in result.stderr, result.stderr


def foreign_things(tmp_path: Path) -> dict[str, Path]:
    """What may stand where a file is to be written: a folder, a FIFO, a socket, a device, and a
    symlink to a file of someone else's."""
    things = {"folder": tmp_path / "a-folder", "fifo": tmp_path / "a-fifo",
              "socket": tmp_path / "a-socket", "device": Path("/dev/null"),
              "symlink": tmp_path / "a-link"}
    things["folder"].mkdir()
    os.mkfifo(things["fifo"])
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(things["socket"]))
    (tmp_path / "theirs.png").write_bytes(b"their bytes")
    things["symlink"].symlink_to(tmp_path / "theirs.png")
    return things


def unchanged(tmp_path: Path, things: dict[str, Path]) -> None:
    assert things["folder"].is_dir() and not any(things["folder"].iterdir())
    assert stat.S_ISFIFO(os.lstat(things["fifo"]).st_mode)
    assert stat.S_ISSOCK(os.lstat(things["socket"]).st_mode)
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    assert things["symlink"].is_symlink() and (tmp_path / "theirs.png").read_bytes() == b"their bytes"


@pytest.mark.parametrize("command", ["sample", "plot"])
def test_out_is_only_ever_a_regular_file(run, tmp_path, command):
    things = foreign_things(tmp_path)
    for kind, path in things.items():
        result = kdl(command, run.name, "--out", path, "--runs-dir", run.parent)
        refused(result, path)
        assert {"folder": "a folder", "fifo": "a FIFO", "socket": "a socket", "device": "a device",
                "symlink": "a symbolic link"}[kind] in result.stderr
    unchanged(tmp_path, things)
    under_a_file = tmp_path / "theirs.png" / "curves.png"
    refused(kdl(command, run.name, "--out", under_a_file, "--runs-dir", run.parent), under_a_file)
    if command == "plot":  # a regular file is replaced, a missing one made with its folders
        ours = tmp_path / "new" / "curves.png"
        for _ in range(2):
            result = kdl("plot", run.name, "--out", ours, "--runs-dir", run.parent)
            assert result.exit_code == 0 and result.last_line == str(ours), result.stderr
            assert ours.read_bytes().startswith(b"\x89PNG")


def outside(tmp_path: Path, name: str, folder: bool) -> Path:
    target = tmp_path / "outside" / name
    if folder:
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("not kdl's\n")
    return target


def test_eval_never_writes_through_a_symlinked_eval_folder(run, tmp_path):
    shutil.rmtree(run / "eval", ignore_errors=True)
    target = outside(tmp_path, "eval", folder=True)
    (run / "eval").symlink_to(target)
    refused(kdl("eval", run.name, "--checkpoint", "last", "--runs-dir", run.parent),
            run / "eval", "symbolic link")
    assert not any(target.iterdir())


def test_resume_never_appends_through_a_symlinked_log(run, tmp_path):
    for name in ("train.log", "metrics.jsonl"):
        target = outside(tmp_path, name, folder=False)
        kept = (run / name).read_text()
        target.write_text(kept)  # (a file that reads as the run's: only the link is wrong)
        (run / name).unlink()
        (run / name).symlink_to(target)
        refused(kdl("train", "--resume", run.name, "--runs-dir", run.parent), run / name)
        assert target.read_text() == kept
        (run / name).unlink()
        (run / name).write_text(kept)
    assert json.loads((run / "meta.json").read_text())["status"] == "interrupted"


def test_a_run_is_never_locked_through_a_symlinked_lock_file(run, tmp_path):
    target = outside(tmp_path, ".lock", folder=False)
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(target)
    refused(kdl("train", "--resume", run.name, "--runs-dir", run.parent), run / ".lock",
            "symbolic link")
    assert target.read_text() == "not kdl's\n"


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "folder", "fifo"])
def test_skip_existing_claims_a_config_only_in_a_file_of_its_own(tmp_path, kind):
    """The claim of `kdl train --skip-existing` on its config, `.sweeps/claims/HASH.lock`,
    is a regular file kdl made: anything else standing there is refused, never followed (nor
    made where a dangling link points)."""
    runs = tmp_path / "runs"
    claim = runs / ".sweeps" / "claims" / f"{load_config(CONFIGS / 'digits_cnn.yaml', TINY).hash()}.lock"
    claim.parent.mkdir(parents=True)
    theirs = outside(tmp_path, "theirs", folder=False)
    if kind == "symlink":
        claim.symlink_to(theirs)
    elif kind == "dangling symlink":
        claim.symlink_to(theirs.with_name("missing"))
    elif kind == "folder":
        claim.mkdir()
    else:
        os.mkfifo(claim)
    refused(train_tiny(runs, "--skip-existing"), claim, {"folder": "a folder", "fifo": "a FIFO"}
            .get(kind, "a symbolic link"))
    assert not list(runs.glob("2*")) and theirs.read_text() == "not kdl's\n"
    assert not theirs.with_name("missing").exists()


@pytest.mark.parametrize("linked", [".sweeps", ".sweeps/claims"])
def test_skip_existing_never_makes_its_claims_through_a_symlinked_folder(tmp_path, linked):
    runs = tmp_path / "runs"
    target = outside(tmp_path, "theirs", folder=True)
    (runs / linked).parent.mkdir(parents=True, exist_ok=True)
    (runs / linked).symlink_to(target)
    refused(train_tiny(runs, "--skip-existing"), runs / linked, "symbolic link")
    assert not any(target.iterdir()) and not list(runs.glob("2*"))


def test_a_sweep_never_records_a_point_through_a_symlinked_record_file(run, tmp_path):
    """A sweep that takes the interrupted run as its point records it in .sweeps/S.jsonl: a
    symlink there is refused, and nothing is resumed."""
    target = outside(tmp_path, "S.jsonl", folder=False)
    (run.parent / ".sweeps").mkdir()
    (run.parent / ".sweeps" / "S.jsonl").symlink_to(target)
    refused(train_tiny(run.parent, "--set", "train.epochs=1", "--skip-existing", "--sweep", "S"),
            run.parent / ".sweeps" / "S.jsonl", "symbolic link")
    assert target.read_text() == "not kdl's\n"
    assert json.loads((run / "meta.json").read_text())["status"] == "interrupted"


def test_samples_never_go_through_a_symlinked_samples_folder(run, tmp_path):
    target = outside(tmp_path, "samples", folder=True)
    (run / "samples").symlink_to(target)
    with pytest.raises(KdlError, match="symbolic link"):
        RunWriter(run)
    (run / "samples").unlink()
    writer = RunWriter(run)
    (run / "samples").symlink_to(target)  # made after the writer looked: still not followed
    with pytest.raises(KdlError, match="symbolic link"):
        writer.write_sample("x", Sample(text="abc"))
    assert not any(target.iterdir())
    (run / "samples").unlink()
    assert writer.write_sample("x", Sample(text="abc"))[0].read_text() == "abc"


def test_rm_removes_only_kdl_runs_in_the_runs_folder(run, tmp_path):
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    for name in ("meta.json", "config.yaml"):
        (elsewhere / name).write_text("{}\n")
    refused(kdl("rm", "--yes", elsewhere, "--runs-dir", run.parent), elsewhere, "runs folder")
    assert (elsewhere / "meta.json").is_file()

    copied = run.parent / "precious"  # inside the runs folder, but not a kdl run's name
    shutil.copytree(elsewhere, copied)
    refused(kdl("rm", "--yes", copied, "--runs-dir", run.parent), copied, "named")
    assert copied.is_dir()

    other = run.parent / "20990101-000000-other-abcdef"  # a run's name, another run's meta.json
    shutil.copytree(run, other)
    refused(kdl("rm", "--yes", other.name, "--runs-dir", run.parent), other, run.name)
    assert other.is_dir()

    removed = kdl("rm", "--yes", run.name, "--runs-dir", run.parent)
    assert removed.exit_code == 0 and not run.exists()


def test_logs_are_appended_to_only_as_regular_files(tmp_path):
    """A link or FIFO made after the writer looked: the open itself refuses it (and never waits
    for a FIFO's reader)."""
    from karpathy_runner.runfolder.fsio import open_append

    (tmp_path / "theirs.log").write_text("theirs\n")
    (tmp_path / "link.log").symlink_to(tmp_path / "theirs.log")
    os.mkfifo(tmp_path / "fifo.log")
    for name in ("link.log", "fifo.log"):
        with pytest.raises(OSError):
            open_append(tmp_path / name)
    assert (tmp_path / "theirs.log").read_text() == "theirs\n"
    with open_append(tmp_path / "ours.log") as log:
        log.write("ours\n")
    assert (tmp_path / "ours.log").read_text() == "ours\n"
