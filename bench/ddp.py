"""DDP's own cost on one GPU: `kdl train CONFIG` against `kdl train CONFIG --nproc-per-node 1`.

The second is torchrun with one process, whose models train through DistributedDataParallel
as a one-GPU DDP run does (over one process, kdl's wrapper runs DDP's forward under its no_sync:
docs/distributed.md); the first is the plain run. Each round trains both, one after the other in
turn, as real `kdl train` commands, on synthetic CIFAR-10 in the real file format (no download,
no validation split), with the same threads: torch's default (what both commands give a user:
torchrun sets OMP_NUM_THREADS=1 only for several processes a machine), or --threads N for both
(the leases before this option: 1). Each run's epoch times come from its metrics.jsonl;
samples/s is over the epochs after the first (warm-up). The median of its logging windows' own
samples/s after the first epoch (train.log_every_steps) is the second figure: an epoch's end
(its checkpoint's writes) falls in one window, which the median leaves out. Prints one JSON line
a run, then each variant's median ratios DDP / plain by both figures, and writes all of it to
--out.

Variants are BATCH:PRECISION: 64:fp32 is configs/cifar_cnn.yaml as it stands (the seed CNN,
small steps, where a per-step cost shows most); 512:bf16 is its fast setting. Another --config
trains on its own data (configs/digits_cnn.yaml: scikit-learn's digits, steps short enough on a
CPU for DDP's fixed cost to show), its samples counted as its whole batches.

    python bench/ddp.py [--device cuda] [--rounds 3] [--epochs 4] [--variants 64:fp32,512:bf16]
        [--config configs/cifar_cnn.yaml] [--out ddp.json] [--per-batch 10000] [--profile DIR]
        [--threads N]

With --profile DIR each training process (the plain run's, the torchrun worker's) runs under
cProfile, its stats written to DIR, and for each variant the functions whose time grew most
from the plain run to the worker's are printed (per training step, round 0): where a whole run's
difference comes from when one step through the wrapper shows none. cProfile slows both alike.
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
from typing import Any

from synthetic_cifar import write_cifar10

ROOT = Path(__file__).resolve().parent.parent
# the children's torchvision accepts the synthetic files (their md5 sums are not the published ones)
ACCEPT = """import torchvision.datasets.cifar as c
c.CIFAR10._check_integrity = lambda self: True
c.check_integrity = lambda *a, **k: True
"""
# --profile: the training process under cProfile (a torchrun worker has RANK; its launcher is left
# out), its stats written as kdl ends it (os._exit, after the exit handlers) or at exit
PROFILE = """
import cProfile, os
_out = os.environ.get("KDL_BENCH_PROFILE")
if _out and (os.environ.get("RANK") or not os.environ.get("KDL_BENCH_PROFILE_RANKED")):
    _profile, _exit = cProfile.Profile(), os._exit
    def _dump():
        _profile.disable()
        _profile.dump_stats(_out)
    def _ended(code):
        _dump()
        _exit(code)
    os._exit = _ended
    __import__("atexit").register(_dump)
    _profile.enable()
"""


def train(mode: str, variant: str, args: argparse.Namespace, work: Path, index: int) -> dict[str, Any]:
    batch, precision = variant.split(":")
    runs = work / f"runs-{index}"
    command = [sys.executable, "-m", "karpathy_runner", "train", str(args.config), "--runs-dir", str(runs),
               "--quiet", *(["--nproc-per-node", "1"] if mode == "ddp" else [])]
    for setting in [f"data.root={work / 'data'}", "data.download=false", "data.val_fraction=0",
                    "train.best_metric=null", f"train.epochs={args.epochs}", f"train.device={args.device}",
                    f"data.batch_size={batch}", f"train.precision={precision}", "train.channels_last=false"]:
        command += ["--set", setting]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(work / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.profile:
        env["KDL_BENCH_PROFILE"] = str(args.profile / f"{index}-{mode}-{slug(variant)}.prof")
        if mode == "ddp":
            env["KDL_BENCH_PROFILE_RANKED"] = "1"
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        return {"mode": mode, "variant": variant, "error": (done.stdout + done.stderr)[-2000:]}
    [folder] = [path for path in runs.iterdir() if not path.name.startswith(".")]
    meta = json.loads((folder / "meta.json").read_text())
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    records = [r for r in logged if r["split"] == "train_epoch"]
    # each train.log_every_steps window's own samples/s after the first epoch: their median
    # leaves out what an epoch's end adds (its checkpoint's writes fall in one window)
    windows = [r["samples_per_s"] for r in logged if r["split"] == "train" and r["epoch"] > 1]
    ends = [r["time"] for r in records]
    epochs = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
    # CIFAR-10's five synthetic files; another config's epoch in whole batches (its steps)
    samples = 5 * args.per_batch if "cifar" in args.config.name else records[0]["step"] * int(batch)
    return {"mode": mode, "variant": variant, "processes": meta.get("processes", 1),
            "backend": meta.get("backend"), "epoch_s": [round(e, 3) for e in epochs],
            "samples_per_s": round(samples / statistics.median(epochs[1:]), 1),
            "window_samples_per_s": round(statistics.median(windows), 1) if windows else None,
            "windows": len(windows), "wall_s": round(wall, 2)}


# a run's two figures: the keys of their DDP / plain ratios in the report, and their printed names
FIGURES = {"samples_per_s": ("", "DDP / plain samples/s"),
           "window_samples_per_s": ("windows_", "by the median window,")}


def ratios_of(results: list[dict[str, Any]], variant: str, rounds: int) -> dict[str, Any]:
    """DDP / plain of `variant` by each figure, round by round, and their median (printed)."""
    by_round = [r for r in results if r["variant"] == variant and "samples_per_s" in r]
    found: dict[str, Any] = {}
    for field, (prefix, said) in FIGURES.items():
        plain = {r["round"]: r[field] for r in by_round if r["mode"] == "plain"}
        ddp = {r["round"]: r[field] for r in by_round if r["mode"] == "ddp"}
        each = [ddp[n] / plain[n] for n in range(rounds) if plain.get(n) and ddp.get(n)]
        if each:
            found[f"{prefix}ddp_over_plain"] = [round(x, 4) for x in each]
            found[f"{prefix}median"] = round(statistics.median(each), 4)
            print(f"{variant}: {said} per round {found[f'{prefix}ddp_over_plain']}, "
                  f"median {found[f'{prefix}median']}", flush=True)
    return found


def slug(variant: str) -> str:
    """A variant (BATCH:PRECISION) as it names its files."""
    return variant.replace(":", "-")


def grown(folder: Path, variant: str, top: int = 25) -> None:
    """The functions whose time per training step grew most from the plain run to the torchrun
    worker's, in round 0 of `variant` (cProfile's own time, and with what they call)."""
    import pstats

    stats = {}
    for mode in ("plain", "ddp"):
        paths = sorted(folder.glob(f"*-{mode}-{slug(variant)}.prof"),
                       key=lambda path: int(path.name.split("-")[0]))
        if not paths:
            print(f"{variant}: no profile of the {mode} run")
            return
        stats[mode] = pstats.Stats(str(paths[0])).stats  # round 0's
    steps = {mode: max((v[1] for (_, _, name), v in table.items() if name == "train_step"), default=1)
             for mode, table in stats.items()}
    rows = []
    for key, (_, calls, own, total, _) in stats["ddp"].items():
        _, plain_calls, plain_own, plain_total, _ = stats["plain"].get(key, (0, 0, 0.0, 0.0, None))
        rows.append(((own / steps["ddp"] - plain_own / steps["plain"]) * 1e6,
                     (total / steps["ddp"] - plain_total / steps["plain"]) * 1e6, calls, plain_calls, key))
    lines = [f"{variant}: the worker's time per step less the plain run's, us (own, with callees), "
             f"{steps['ddp']} / {steps['plain']} steps"]
    for own, total, calls, plain_calls, (file, line, name) in sorted(rows, reverse=True)[:top]:
        lines.append(f"  {own:9.1f} {total:9.1f}  calls {calls:7d} / {plain_calls:7d}  "
                     f"{file.rsplit('site-packages/', 1)[-1]}:{line} {name}")
    (folder / f"grown-{slug(variant)}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--variants", default="64:fp32,512:bf16")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cifar_cnn.yaml")
    parser.add_argument("--per-batch", type=int, default=10_000,
                        help="synthetic images per CIFAR file (5 train files, 1 test file)")
    parser.add_argument("--out", type=Path, default=Path("ddp.json"))
    parser.add_argument("--profile", type=Path, help="a folder for each training process's cProfile stats")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS of both runs (default: the environment's)")
    args = parser.parse_args()
    args.config = args.config.resolve()
    if args.profile:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        write_cifar10(work / "data", args.per_batch)
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(ACCEPT + (PROFILE if args.profile else ""))
        for round_ in range(args.rounds):
            for variant in args.variants.split(","):
                # each round starts with the other mode: neither always runs on a warmer GPU
                for mode in (("plain", "ddp") if round_ % 2 == 0 else ("ddp", "plain")):
                    result = {"round": round_, **train(mode, variant, args, work, len(results))}
                    print(json.dumps(result), flush=True)
                    results.append(result)
    ratios = {}
    for variant in args.variants.split(","):
        found = ratios_of(results, variant, args.rounds)
        if found:
            ratios[variant] = found
    if args.profile:
        for variant in args.variants.split(","):
            grown(args.profile, variant)
    report = {"config": str(args.config.relative_to(ROOT)), "device": args.device, "epochs": args.epochs,
              "threads": args.threads,
              "results": results, "ratios": ratios}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
