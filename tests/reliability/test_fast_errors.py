"""Mistakes on the command line are answered before torch loads (which takes seconds): a missing
or wrong config, a bad --set, an unknown run. Checked by what the process imported, not by time."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kdl import CONFIGS

CONFIG = str(CONFIGS / "digits_cnn.yaml")

CASES = [
    (["train", "nonexistent.yaml"], "config file 'nonexistent.yaml' does not exist"),
    (["train", CONFIG, "--set", "optimizer.lrr=0.1"], "optimizer.lrr: unknown key"),
    (["train", CONFIG, "--set", "train.epochs=0"], "train.epochs"),
    (["train", "--resume", "nosuchrun"], "no run 'nosuchrun'"),
    (["eval", "nosuchrun"], "no run 'nosuchrun'"),
    (["sample", "nosuchrun"], "no run 'nosuchrun'"),
    (["validate", CONFIG, "--set", "model.name=transformer"], "model.name"),
    (["sweep", CONFIG, "--trials", "3", "--space", "optimizer.lr=loguniform(0,1)"], "loguniform"),
    (["sweep", CONFIG, "--trials", "3", "--space", "optimizer.lrr=uniform(0,1)"], "optimizer.lrr"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a[:2]) for a, _ in CASES])
def test_error_comes_before_torch_loads(tmp_path, args, message):
    probe = ("import runpy, sys; sys.argv = ['kdl', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('karpathy_runner', run_name='__main__')\n"
             "finally:\n    print('torch loaded' if 'torch' in sys.modules else 'torch not loaded',"
             " file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe, *args, *(["--runs-dir", str(tmp_path)]
                                                                  if args[0] != "validate" else [])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("torch not loaded"), result.stderr
