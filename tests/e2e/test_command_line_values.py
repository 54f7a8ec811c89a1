"""Values given on the command line (--set, --grid, --space, --where) are read within the bounds
of YAML in a config file: an alias bomb or a deep nesting is refused at once with exit 2, never a
minutes-long expansion or a RecursionError; and an error message quotes a value at most a few
hundred characters long, listing a limited number of problems."""

from __future__ import annotations

import os

import pytest
from kdl import CONFIGS, kdl

CONFIG = str(CONFIGS / "digits_cnn.yaml")
# 300 bytes that stand for 9**4 * 6 * ... values once every alias is expanded
BOMB = ("[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e]]")
DEEP = "[" * 5000 + "]" * 5000  # beyond libyaml's own bound (1,000 levels)
DEEPER_THAN_OURS = "[" * 900 + "]" * 900  # within libyaml's: kdl's bound (100) refuses it

OPTIONS = {
    "--set": lambda v: ["validate", CONFIG, "--set", f"model.channels={v}"],
    "--grid": lambda v: ["sweep", CONFIG, "--emit", "--grid", f"model.channels={v}"],
    "--space": lambda v: ["sweep", CONFIG, "--trials", "1", "--space", f"model.channels=choice({v})"],
    "--where": lambda v: ["runs", "--where", f"model.channels={v}"],
}


@pytest.mark.parametrize("value, why", [(BOMB, "expand to more than 100,000 values"),
                                        (DEEP, "nests more than 100 levels deep"),
                                        (DEEPER_THAN_OURS, "nests more than 100 levels deep")],
                         ids=["aliases", "depth", "depth-900"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_value_beyond_the_bounds_of_a_config_file_is_refused(runs_dir, option, value, why):
    runs_dir.mkdir()
    result = kdl(*OPTIONS[option](value))
    assert result.exit_code == 2, result.stderr
    assert f"{option} model.channels: the value is refused: " in result.stderr and why in result.stderr
    assert len(result.stderr) < 300 and not any(run.is_dir() for run in runs_dir.iterdir())


def test_an_error_quotes_a_long_value_cut_short():
    result = kdl("validate", CONFIG, "--set", "data.name=" + "x" * 5000)
    assert result.exit_code == 2
    assert "unknown dataset 'xxx" in result.stderr and "(5,002 characters in all)" in result.stderr
    assert len(result.stderr) < 700

    unparsable = kdl("validate", CONFIG, "--set", "model.channels=[" + "1," * 3000)
    assert unparsable.exit_code == 2 and "is not a valid YAML scalar or list" in unparsable.stderr
    assert len(unparsable.stderr) < 700


def test_a_value_with_thousands_of_problems_lists_the_first():
    result = kdl("validate", CONFIG, "--set", "model.channels=[" + ",".join(["x"] * 5000) + "]")
    assert result.exit_code == 2
    assert "model.channels.19: must be a valid integer" in result.stderr
    assert "model.channels.20:" not in result.stderr and "... and 4,980 more" in result.stderr


@pytest.mark.parametrize("args, said", [
    (["--temperature", "nan"], "--temperature nan: give a finite number from 0.01 up"),
    (["--temperature", "inf"], "--temperature inf: give a finite number from 0.01 up"),
    (["--seed", str(2**64)], "is not in the range"),
], ids=["temperature nan", "temperature inf", "seed 2**64"])
def test_sample_refuses_numbers_it_cannot_draw_with(runs_dir, args, said):
    result = kdl("sample", "somerun", *args)
    assert result.exit_code == 2 and said in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("dist", ["uniform(1,.inf)", "loguniform(1e-3,.inf)", "uniform(.nan,1)",
                                  "uniform(-.inf,1)"])
def test_a_searched_range_has_finite_bounds(runs_dir, dist):
    result = kdl("sweep", CONFIG, "--trials", "1", "--space", f"optimizer.lr={dist}")
    assert result.exit_code == 2 and "takes finite bounds (not .inf or .nan)" in result.stderr
    assert not runs_dir.exists() or not any(p.is_dir() and not p.name.startswith(".")
                                            for p in runs_dir.iterdir())


@pytest.mark.parametrize("storage, reason", [
    ("notaurl", "Could not parse SQLAlchemy URL"), ("foo://x", "Can't load plugin"),
    ("sqlite:///{tmp}/garbage.db", "file is not a database"),
    ("sqlite:///{tmp}", "unable to open database file"),
    ("sqlite:///{tmp}/missing/parent/x.db", "unable to open database file"),
    (None, "file is not a database"),  # the default studies.db, overwritten
], ids=["not a URL", "unknown dialect", "not a database", "a folder", "missing parent", "default"])
def test_a_study_storage_optuna_cannot_open_is_named(runs_dir, tmp_path, storage, reason):
    (tmp_path / "garbage.db").write_text("garbage\n" * 100)
    (runs_dir / ".studies").mkdir(parents=True)
    (runs_dir / ".studies" / "studies.db").write_text("garbage\n" * 100)
    given = [] if storage is None else ["--storage", storage.format(tmp=tmp_path)]
    result = kdl("sweep", CONFIG, "--trials", "1", "--space", "optimizer.lr=loguniform(1e-3,1e-2)",
                 *given)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "Optuna cannot open it" in result.stderr and reason in result.stderr
    assert "sqlite:///studies.db" in result.stderr  # the fix


@pytest.mark.parametrize("where", ["a file", "under a file", "a symlink loop"])
def test_a_search_into_a_runs_folder_it_cannot_make_is_refused(tmp_path, monkeypatch, where):
    (tmp_path / "afile").write_text("x")
    os.symlink("loop", tmp_path / "loop")
    runs = {"a file": tmp_path / "afile", "under a file": tmp_path / "afile" / "runs",
            "a symlink loop": tmp_path / "loop" / "runs"}[where]
    monkeypatch.setenv("KDL_RUNS_DIR", str(runs))
    result = kdl("sweep", CONFIG, "--trials", "1", "--space", "optimizer.lr=loguniform(1e-3,1e-2)")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert f"cannot create the runs folder {runs}" in result.stderr and "KDL_RUNS_DIR" in result.stderr
