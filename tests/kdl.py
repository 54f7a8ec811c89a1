"""Run the `kdl` command line in-process, as a shell would (exit code, stdout, stderr)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from karpathy_runner.cli import app

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# a digits run small enough for tests: two tiny conv stages, a couple of epochs
TINY = [
    "model.channels=[8,16]",
    "train.epochs=2",
    "data.batch_size=64",
    "train.log_every_steps=5",
    "train.device=cpu",
]


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""


def kdl(*args: str) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def train_tiny(runs: Path, *extra: str) -> Result:
    """`kdl train configs/digits_cnn.yaml` shrunk by TINY, into `runs`, quietly."""
    sets = [item for s in TINY for item in ("--set", s)]
    return kdl("train", CONFIGS / "digits_cnn.yaml", *sets, "--runs-dir", runs, "--quiet", *extra)
