"""How long the read-side commands take to answer, over 300 realistic run folders.

    python bench/cli_latency.py [--runs 300] [--repeat 15] [--source RUN_FOLDER]

Trains one tiny real run (digits, 3 epochs, CPU, ~10 s) unless --source names a run folder, copies
it --runs times into a temporary runs folder with varied ids, names, statuses, sweeps, learning
rates, seeds and metrics (checkpoints left out: no command timed here reads them), then times each
command as a fresh process, --repeat times after two warm-up calls, and prints median and min.
Targets (medians, 2 cores): `kdl --help` 0.15 s, `kdl runs` 0.25 s, and every mistake (a missing
config, a bad --set, an unknown run) answered in under 0.5 s, before torch loads. A figure over its
target is marked MISSED; the script reports, it does not fail.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KDL = str(Path(sys.executable).parent / "kdl")
NAMES = ("digits_cnn", "mnist_cnn", "cifar_cnn")
STATUSES = ("completed",) * 8 + ("failed", "interrupted")
LRS = (0.1, 0.03, 0.01, 0.003)


def train_source(folder: Path) -> Path:
    command = [KDL, "train", str(REPO / "configs/digits_cnn.yaml"), "--set", "train.epochs=3",
               "--quiet", "--runs-dir", str(folder)]
    run_id = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1]
    return folder / run_id


def make_copies(source: Path, root: Path, count: int) -> None:
    """Copies of a real run folder with varied ids and values, in the same file formats."""
    rng = random.Random(0)
    meta = json.loads((source / "meta.json").read_text())
    summary = json.loads((source / "summary.json").read_text())
    config = (source / "config.yaml").read_text()
    for index in range(count):
        name, status, lr = rng.choice(NAMES), rng.choice(STATUSES), rng.choice(LRS)
        created = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=index)
        run_id = f"{created:%Y%m%d-%H%M%S}-{name}-{index:06x}"
        folder = root / run_id
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.pt", "tb"))
        scale = 1 + rng.random()  # different but plausible metrics for every copy
        best = {**meta["best"], "value": meta["best"]["value"] * scale}
        run_meta = {**meta, "id": run_id, "name": name, "status": status, "best": best,
                    "created_at": created.isoformat(timespec="seconds")}
        if index % 5 == 0:
            run_meta["sweep"] = {"id": f"sweep-{index // 50}", "point": {"optimizer.lr": lr}}
        (folder / "meta.json").write_text(json.dumps(run_meta, indent=2))
        final = {key: value * scale for key, value in summary["final"].items()}
        (folder / "summary.json").write_text(json.dumps({**summary, "final": final, "best": best}))
        text = re.sub(r"(?m)^  lr: .*$", f"  lr: {lr}", config)
        text = re.sub(r"(?m)^seed: .*$", f"seed: {index % 3}", text)
        (folder / "config.yaml").write_text(re.sub(r"(?m)^name: .*$", f"name: {name}", text))


def time_command(args: list[str], repeat: int, env: dict[str, str], exit_code: int = 0) -> list[float]:
    times = []
    for attempt in range(repeat + 2):
        started = time.perf_counter()
        done = subprocess.run([KDL, *args], capture_output=True, env=env)
        if done.returncode != exit_code:
            raise SystemExit(f"kdl {' '.join(args)} exited {done.returncode}, not {exit_code}:\n"
                             + done.stderr.decode())
        if attempt >= 2:  # the first two calls warm the file cache and .pyc files
            times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--source", type=Path, help="a run folder to copy (default: train one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdl-bench-") as tmp:
        source = args.source or train_source(Path(tmp) / "source")
        root = Path(tmp) / "runs"
        root.mkdir()
        make_copies(source, root, args.runs)
        env = {**os.environ, "KDL_RUNS_DIR": str(root), "COLUMNS": "200"}
        first_id = sorted(os.listdir(root))[0]
        config = str(REPO / "configs/digits_cnn.yaml")
        commands = [  # (arguments, target median in seconds, exit code)
            (["--help"], 0.15, 0),
            (["runs"], 0.25, 0),
            (["runs", "--sort", "val.accuracy", "--limit", "10"], None, 0),
            (["runs", "--where", "optimizer.lr=0.01", "--status", "completed"], None, 0),
            (["show", first_id], None, 0),
            (["compare", "--sweep", "sweep-0", "--group-by", "optimizer.lr"], None, 0),
            (["train", "nonexistent.yaml"], 0.5, 2),
            (["train", config, "--set", "optimizer.lrr=0.1"], 0.5, 2),
            (["train", config, "--set", "train.epochs=0"], 0.5, 2),
            (["train", "--resume", "nosuchrun"], 0.5, 2),
            (["eval", "nosuchrun"], 0.5, 2),
        ]
        print(f"{args.runs} run folders, {args.repeat} timed calls each; python {sys.version.split()[0]}")
        print(f"{'median':>8} {'min':>7} {'target':>7}  command")
        for command, target, exit_code in commands:
            times = time_command(command, args.repeat, env, exit_code)
            median = statistics.median(times)
            verdict = "" if target is None else "ok" if median <= target else "MISSED"
            shown_target = f"{target:.2f}" if target else "-"
            print(f"{median:8.3f} {min(times):7.3f} {shown_target:>7}  kdl {' '.join(command)}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
