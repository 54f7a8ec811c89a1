"""Where the wall time of `kdl train` goes: start-up (imports, data, model) against the loop.

Runs `python -m karpathy_runner train CONFIG --quiet` as a user would, several times, and splits
each run's wall time into the loop (summary.json's duration_s: epochs, evaluation, checkpoints)
and everything else (interpreter, imports, reading the data, building the model, the run
folder). `--source` runs another checkout of kdl (e.g. an older commit, unpacked with
`git archive COMMIT | tar -x -C DIR`) to compare against.

    python bench/startup.py [--config configs/digits_cnn.yaml] [--runs 3] [--source DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(source: Path, config: str, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, loop seconds) of one `kdl train` process."""
    with tempfile.TemporaryDirectory() as runs:
        env = {**os.environ, "PYTHONPATH": str(source)}
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "karpathy_runner", "train", config, "--quiet",
             "--runs-dir", runs, *extra],
            cwd=source, env=env, capture_output=True, text=True,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"kdl train failed:\n{done.stderr}")
        run = Path(runs) / done.stdout.strip().splitlines()[-1]
        loop = json.loads((run / "summary.json").read_text())["duration_s"]
    return wall, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits_cnn.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--source", type=Path, default=ROOT, help="the kdl checkout to run")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    extra = [item for s in args.overrides for item in ("--set", s)]
    results = [one_run(args.source.resolve(), args.config, extra) for _ in range(args.runs)]
    walls, loops = [w for w, _ in results], [loop for _, loop in results]
    starts = [w - loop for w, loop in results]
    print(f"{args.config} from {args.source}: {args.runs} runs, {os.cpu_count()} CPUs (median)")
    print(f"  wall:     {statistics.median(walls):6.2f} s   ({', '.join(f'{w:.2f}' for w in walls)})")
    print(f"  loop:     {statistics.median(loops):6.2f} s")
    print(f"  start-up: {statistics.median(starts):6.2f} s   (wall minus loop; "
          f"{statistics.median(starts) / statistics.median(walls):.0%} of the wall time)")


if __name__ == "__main__":
    main()
