"""Hostile or damaged run folders, run through every command that reads runs: none raises, none
hides the other runs; the damaged run is shown as damaged with the file and the reason, and
`kdl eval` and `kdl train --resume` refuse it with exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from kdl import kdl

HEALTHY = "20990101-000000-healthy-aaaaaa"


def write(name: str, data: bytes | str):
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return damage


def edit_meta(**fields):
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, **fields}))
    return damage


def with_metrics_line(line: bytes):
    def damage(folder: Path) -> None:
        lines = (folder / "metrics.jsonl").read_bytes().splitlines(keepends=True)
        (folder / "metrics.jsonl").write_bytes(b"".join([*lines[:2], line + b"\n", *lines[2:]]))
    return damage


def checkpoints(change):
    """Both checkpoints loaded, changed, saved again (weights_only still loads them)."""
    def damage(folder: Path) -> None:
        for which in ("last", "best"):
            path = folder / "checkpoints" / f"{which}.pt"
            state = torch.load(path, weights_only=True)
            torch.save(change(state), path)
    return damage


def both_checkpoints(data: bytes):
    def damage(folder: Path) -> None:
        for which in ("last", "best"):
            (folder / "checkpoints" / f"{which}.pt").write_bytes(data)
    return damage


# (case, damage, the file named, what is said about it); eval and resume must refuse each
CASES = [
    ("meta.json a list", write("meta.json", "[1, 2, 3]"), "meta.json", "holds a JSON list"),
    ("pid not an integer", edit_meta(status="running", pid="12ab"), "meta.json", "'pid' is '12ab'"),
    ("meta.json nested 100000 deep", write("meta.json", "[" * 100_000 + "]" * 100_000),
     "meta.json", "nested too deeply"),
    ("pid beyond any process id", edit_meta(status="running", pid=10**30), "meta.json",
     "'pid' is 1000000000000000000000000000000, not a process id"),
    ("pid -1 of a running run", edit_meta(status="running", pid=-1), "meta.json",
     "'pid' is -1, not a process id"),
    ("summary.json a list", write("summary.json", "[]"), "summary.json", "holds a JSON list"),
    ("config.yaml overwritten", write("config.yaml", bytes(range(256)) * 8), "config.yaml",
     "is not UTF-8 text"),
    ("config.yaml not a config", write("config.yaml", "- just\n- a list\n"), "config.yaml",
     "not a mapping"),
    ("metrics.jsonl overwritten", write("metrics.jsonl", b"\x00garbage\n" * 1000), "metrics.jsonl",
     "not metric records"),
    ("binary config.yaml", write("config.yaml", b"name: x\n\xff\xfe\x00\x9c binary\n"),
     "config.yaml", "is not UTF-8 text"),
    ("binary in metrics.jsonl", with_metrics_line(b"\xff\xfe\x00\x9c\x80"), "metrics.jsonl",
     "not metric records"),
    ("metrics record without epoch", with_metrics_line(b'{"step": 3, "split": "train"}'),
     "metrics.jsonl", "not metric records"),
    ("checkpoint without its loop", checkpoints(lambda s: {k: v for k, v in s.items() if k != "loop"}),
     ".pt", "is not a kdl checkpoint"),
    ("checkpoint with extra keys", checkpoints(lambda s: {**s, "extra": 1,
                                                          "loop": {**s["loop"], "more": 2}}),
     ".pt", "is not a kdl checkpoint"),
    ("zero-byte checkpoints", both_checkpoints(b""), ".pt", "cannot be read"),
    ("garbage checkpoints", both_checkpoints(bytes(range(256)) * 4), ".pt",
     "is not a kdl checkpoint"),
]
# damage a listing sees at a glance (config.yaml's start, metrics.jsonl's first and last lines)
GLANCED = {"binary config.yaml", "config.yaml overwritten", "config.yaml not a config",
           "metrics.jsonl overwritten"}
CHECKPOINT_CASES = {"checkpoint without its loop", "checkpoint with extra keys",
                    "zero-byte checkpoints", "garbage checkpoints"}


@pytest.fixture
def runs(trained, tmp_path):
    """The trained run twice: a healthy copy and one to damage (marked interrupted: resumable)."""
    root = tmp_path / "runs"
    shutil.copytree(trained, root / HEALTHY)
    shutil.copytree(trained, root / trained.name)
    meta = json.loads((root / trained.name / "meta.json").read_text())
    (root / trained.name / "meta.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    return root


def no_traceback(result) -> None:
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("case, damage, file, reason", CASES, ids=[c[0] for c in CASES])
def test_every_read_command_survives_a_damaged_run(runs, trained, tmp_path, case, damage, file,
                                                   reason):
    damaged = trained.name
    damage(runs / damaged)
    where = ("--runs-dir", runs)
    files_of_the_run = case not in CHECKPOINT_CASES  # read by the listing commands

    listed = kdl("runs", *where)
    assert listed.exit_code == 0, listed.stderr
    no_traceback(listed)
    assert HEALTHY in listed.stdout and damaged in listed.stdout
    rows = {row["id"]: row for row in json.loads(kdl("runs", *where, "--json").stdout)}
    assert rows[HEALTHY]["status"] == "completed" and damaged in rows
    if file == "meta.json" or case in GLANCED:  # a listing reads meta.json, glances at the rest
        assert rows[damaged]["status"] == "damaged" and reason in rows[damaged]["damage"]
        assert f"{damaged} is damaged: {file}" in listed.stderr
    for sort in ("val.accuracy", "best", "optimizer.lr"):
        result = kdl("runs", *where, "--sort", sort)
        assert result.exit_code == 0 and HEALTHY in result.stdout, (sort, result.stderr)

    shown = kdl("show", damaged, *where)
    assert shown.exit_code == 0, shown.stderr
    no_traceback(shown)
    if files_of_the_run:
        assert f"damaged: {file} " in shown.stdout and reason in shown.stdout

    for command in (["compare", HEALTHY, damaged], ["compare", HEALTHY, damaged, "--json"],
                    ["plot", HEALTHY, damaged, "--out", tmp_path / "curves.png"]):
        result = kdl(*command, *where)
        assert result.exit_code == 0, (command, result.stderr)
        no_traceback(result)

    for command in (["eval", damaged], ["eval", damaged, "--checkpoint", "last"],
                    ["train", "--resume", damaged]):
        result = kdl(*command, *where)
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        no_traceback(result)
        assert file in result.stderr and reason in result.stderr, (command, result.stderr)
        assert "could run code" not in result.stderr
    if files_of_the_run:  # refused for its files: the removal it names works as printed
        (removal,) = re.findall(r"remove the run with `(kdl rm [^`]+)`", " ".join(result.stderr.split()))
        assert kdl(*shlex.split(removal)[1:], "--yes").exit_code == 0, removal
        assert not (runs / damaged).exists() and (runs / HEALTHY).is_dir()


def test_a_symlink_in_the_runs_folder_is_not_a_run(runs, trained, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(trained, elsewhere)
    os.symlink(elsewhere, runs / "20990101-000000-link-bbbbbb")
    listed = json.loads(kdl("runs", "--runs-dir", runs, "--json").stdout)
    assert sorted(row["id"] for row in listed) == sorted([HEALTHY, trained.name])
    removed = kdl("rm", "--yes", "20990101-000000-link", "--runs-dir", runs)
    assert removed.exit_code == 2 and "no run" in removed.stderr
    no_traceback(removed)
    assert (elsewhere / "meta.json").is_file()


class Hung(BaseException):
    """Not an OSError (as TimeoutError is), which a reader of damaged files would catch."""


@contextlib.contextmanager
def within(seconds: float):
    """Fail instead of hanging: a read that waits on a FIFO is stopped by an alarm."""
    def expired(signum, frame):
        raise Hung(f"still waiting after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["meta.json", "metrics.jsonl", "summary.json", "config.yaml",
                                  "vocab.json"])
def test_a_fifo_in_a_run_folder_is_read_as_damage_not_waited_on(runs, trained, name):
    """Opening a FIFO to read waits for a writer: kdl reads only regular files, so a FIFO (or a
    device) where a run's file should be is damage, named, and the other runs are listed."""
    damaged = runs / trained.name
    (damaged / name).unlink(missing_ok=True)
    os.mkfifo(damaged / name)
    where = ("--runs-dir", runs)
    with within(20):
        rows = {row["id"]: row for row in json.loads(kdl("runs", *where, "--json").stdout)}
        shown = kdl("show", trained.name, *where)
        compared = kdl("compare", HEALTHY, trained.name, *where)
    assert rows[HEALTHY]["status"] == "completed"
    assert shown.exit_code == 0 and compared.exit_code == 0, shown.stderr + compared.stderr
    said = (rows[trained.name]["damage"] or "") + shown.stdout
    if name != "vocab.json":  # read by eval and resume only
        assert f"{name} cannot be read (not a regular file)" in said


def test_rm_and_compare_survive_a_pid_beyond_any_process(runs, trained):
    meta = json.loads((runs / trained.name / "meta.json").read_text())
    (runs / trained.name / "meta.json").write_text(json.dumps({**meta, "pid": 10**30}))
    where = ("--runs-dir", runs)
    for command in (["runs"], ["show", trained.name], ["compare", HEALTHY, trained.name]):
        result = kdl(*command, *where)
        assert result.exit_code == 0, (command, result.stderr)
        no_traceback(result)
    removed = kdl("rm", "--yes", trained.name, *where)
    no_traceback(removed)
    assert removed.exit_code == 0 and not (runs / trained.name).exists()
