"""Families from installed packages (a `kdl.families` entry point), in processes of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import toytask
import yaml
from kdl import CONFIGS


def _plugin(root: Path, module: str, code: str) -> dict[str, str]:
    """An installed package that declares a `kdl.families` entry point (its dist-info, as pip
    writes it) whose module is `code`; the environment that puts it on the path."""
    (root / f"{module}.py").write_text(code)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdl.families]\n{module} = {module}\n")
    tests = Path(toytask.__file__).parent
    path = [str(root), str(tests), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_an_installed_package_adds_a_family_to_every_kdl_process(tmp_path):
    """A package that declares a `kdl.families` entry point gets its families registered in
    every kdl process: a sweep's points are processes of their own."""
    env = _plugin(tmp_path, "kdl_toy_mlp", "import toytask\n"
                  "from karpathy_runner.config.families import register\n"
                  "register(toytask.ToyMLPConfig)\n")
    config = tmp_path / "mlp.yaml"
    config.write_text(yaml.safe_dump({"name": "mlp", "data": {"name": "digits"},
                                      "model": {"name": "toy_mlp"}, "train": {"epochs": 1, "device": "cpu"}}))
    swept = subprocess.run([sys.executable, "-m", "karpathy_runner", "sweep", str(config), "--grid",
                            "model.hidden=8,16", "--runs-dir", str(tmp_path / "runs")],
                           env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)
    assert swept.returncode == 0, swept.stderr
    runs = [json.loads((run / "meta.json").read_text()) for run in (tmp_path / "runs").iterdir()
            if (run / "meta.json").is_file()]
    assert sorted((r["model"], r["status"]) for r in runs) == [("toy_mlp", "completed")] * 2


def test_a_plugin_that_fails_to_load_is_named(tmp_path):
    env = _plugin(tmp_path, "kdl_broken", "raise RuntimeError('no such thing')\n")
    result = subprocess.run([sys.executable, "-m", "karpathy_runner", "validate",
                             str(CONFIGS / "digits_cnn.yaml")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the kdl family plugin 'kdl_broken' (kdl_broken" in result.stderr
    assert "RuntimeError: no such thing" in result.stderr
