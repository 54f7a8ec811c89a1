"""What a sweep's points spend starting: a grid and a halving search of small digits runs, timed
whole (wall and CPU of the command and all its processes), for one or more checkouts of kdl.

    python bench/sweep_start.py [--tree DIR]... [--rounds 3] [--jobs 2]

Each `--tree` is a checkout of the repository (default: this one), put first on PYTHONPATH; the
trees are alternated within each round, one thread a process (OMP_NUM_THREADS=1). The grid is 6
points of 2 epochs; the search 9 trials halved by 3 from 1 epoch to 15 (14 trainings, 33
epochs). Prints the median wall and CPU seconds of each command for each tree.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/digits_cnn.yaml")
COMMANDS = {
    "grid": ["sweep", CONFIG, "--grid", "optimizer.lr=1e-3,3e-3,1e-2", "--grid", "model.dropout=0,0.2",
             "--set", "train.epochs=2"],
    "halving": ["sweep", CONFIG, "--search", "random", "--trials", "9", "--halving", "3",
                "--space", "optimizer.lr=loguniform(3e-4,3e-2)", "--space", "model.dropout=uniform(0.0,0.5)"],
}


def timed(tree: Path, command: list[str], jobs: int) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, every process it waited for) of one command."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as runs:
        subprocess.run([sys.executable, "-m", "karpathy_runner", *command, "--jobs", str(jobs),
                        "--runs-dir", runs], env=env, check=True, capture_output=True, cwd=runs)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout of kdl (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.tree or [REPO]]
    figures: dict[tuple[str, Path], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for name, command in COMMANDS.items():
            for tree in trees if round_ % 2 == 0 else trees[::-1]:
                wall, cpu = timed(tree, command, args.jobs)
                figures.setdefault((name, tree), []).append((wall, cpu))
                print(f"round {round_ + 1} {name:<8} {tree}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    print()
    for (name, tree), runs in figures.items():
        print(f"{name:<8} {tree}: median {statistics.median(w for w, _ in runs):.1f} s wall, "
              f"{statistics.median(c for _, c in runs):.1f} s CPU over {len(runs)} rounds")


if __name__ == "__main__":
    main()
