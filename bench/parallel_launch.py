"""Parallel launches: N `kdl train` processes started in the same second into one runs folder.

    python bench/parallel_launch.py [--n 32] [--steps 3] [--threads 1] [--runs-dir DIR]

Starts N real `kdl train configs/digits_cnn.yaml` processes back to back (a tiny model, a few
steps, a mid-run checkpoint, seeds 0..N-1, the same run name), waits for all of them, then
checks what they share: N distinct run folders, each completed, meta.json naming its own id and
pid, config.yaml and metrics.jsonl intact, both checkpoints loading with weights_only=True, no
temp file left; and `kdl runs --json` listing exactly those N runs. Prints the launch spread,
wall time and per-process times. Exit code 1 if any check fails.
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

REPO = Path(__file__).resolve().parents[1]


def launch(runs: Path, seed: int, steps: int, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "karpathy_runner", "train", str(REPO / "configs/digits_cnn.yaml"),
               "--set", "model.channels=[4]", "--set", "train.device=cpu",
               "--set", f"train.max_steps={steps}", "--set", "train.checkpoint_every_steps=1",
               "--set", "data.batch_size=128", "--set", f"seed={seed}",
               "--runs-dir", str(runs), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def check(runs: Path, ids: list[str], pids: list[int]) -> list[str]:
    """Everything the processes shared, read back; one line per problem."""
    import torch
    import yaml

    from karpathy_runner.errors import KdlError
    from karpathy_runner.runfolder.checkpoint import load_checkpoint

    problems = []
    folders = sorted(p.name for p in runs.iterdir())
    if len(set(ids)) != len(ids) or sorted(ids) != folders:
        problems.append(f"{len(set(ids))} distinct ids printed, {len(folders)} folders")
    for run_id, pid in zip(ids, pids, strict=True):
        folder = runs / run_id
        meta = json.loads((folder / "meta.json").read_text())
        if (meta["status"], meta["id"], meta["pid"]) != ("completed", run_id, pid):
            problems.append(f"{run_id}: meta says {meta['status']}, {meta['id']}, pid {meta['pid']}")
        yaml.safe_load((folder / "config.yaml").read_text())
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        if not lines or any(json.loads(line)["step"] < 1 for line in lines):
            problems.append(f"{run_id}: metrics.jsonl is empty or damaged")
        for which in ("last", "best"):
            try:
                state = load_checkpoint(folder / "checkpoints" / f"{which}.pt")
            except KdlError as exc:
                problems.append(f"{run_id}: {exc}")
                continue
            if not all(torch.isfinite(t).all() for t in state["models"]["model"].values()):
                problems.append(f"{run_id}: {which}.pt holds non-finite weights")
        if list(folder.rglob("*.tmp")):
            problems.append(f"{run_id}: temp files left behind")
    listed = subprocess.run([sys.executable, "-m", "karpathy_runner", "runs", "--runs-dir", str(runs),
                             "--json"], capture_output=True, text=True, check=True)
    rows = json.loads(listed.stdout)
    if sorted(r["id"] for r in rows) != sorted(ids) or {r["status"] for r in rows} != {"completed"}:
        problems.append("kdl runs does not list exactly the N completed runs")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs_dir or Path(tmp) / "runs"
        started = time.perf_counter()
        processes = [launch(runs, seed, args.steps, env) for seed in range(args.n)]
        launched = time.perf_counter() - started
        finished: dict[int, float] = {}
        while len(finished) < len(processes):
            for i, process in enumerate(processes):
                if i not in finished and process.poll() is not None:
                    finished[i] = time.perf_counter() - started
            time.sleep(0.05)
        wall = time.perf_counter() - started
        outputs = [p.communicate() for p in processes]
        codes = [p.returncode for p in processes]
        ids = [out.strip().splitlines()[-1] if out.strip() else "" for out, _ in outputs]
        seconds = {run_id.split("-")[1] for run_id in ids if run_id}
        problems = [f"process {i} exited {code}: {outputs[i][1].strip()[-300:]}"
                    for i, code in enumerate(codes) if code != 0]
        if not problems:
            problems = check(runs, ids, [p.pid for p in processes])
        times = sorted(finished.values())
        print(f"{args.n} processes launched in {launched:.2f} s; their run ids carry "
              f"{len(seconds)} distinct second(s): {', '.join(sorted(seconds))}")
        print(f"all exited after {wall:.1f} s wall ({os.cpu_count()} CPUs, OMP_NUM_THREADS="
              f"{args.threads}); per process: first {times[0]:.1f} s, median "
              f"{statistics.median(times):.1f} s, last {times[-1]:.1f} s")
        print(f"exit codes: {sorted(set(codes))}; distinct run folders: {len(set(ids))}")
        for problem in problems:
            print(f"PROBLEM: {problem}")
        print("OK: distinct folders, all completed, nothing shared corrupted" if not problems
              else f"{len(problems)} problem(s)")
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
