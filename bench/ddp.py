"""DDP's own cost on one GPU: `kdl train CONFIG` against `kdl train CONFIG --nproc-per-node 1`.

The second is torchrun with one process, whose models train through DistributedDataParallel
(its gradient buckets, hooks and one all-reduce over a group of one per bucket), as a one-GPU
DDP run does; the first is the plain run. Each round trains both, one after the other in turn,
as real `kdl train` commands, on synthetic CIFAR-10 in the real file format (no download, no
validation split), with the same OMP_NUM_THREADS (1, what torchrun sets). Each run's epoch times
come from its metrics.jsonl; samples/s is over the epochs after the first (warm-up). Prints one
JSON line a run, then each variant's median ratio DDP / plain, and writes all of it to --out.

Variants are BATCH:PRECISION: 64:fp32 is configs/cifar_cnn.yaml as it stands (the seed CNN,
small steps, where a per-step cost shows most); 512:bf16 is its fast setting. Another --config
trains on its own data (configs/digits_cnn.yaml: scikit-learn's digits, steps short enough on a
CPU for DDP's fixed cost to show), its samples counted as its whole batches.

    python bench/ddp.py [--device cuda] [--rounds 3] [--epochs 4] [--variants 64:fp32,512:bf16]
        [--config configs/cifar_cnn.yaml] [--out ddp.json] [--per-batch 10000]
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


def train(mode: str, variant: str, args: argparse.Namespace, work: Path, index: int) -> dict[str, Any]:
    batch, precision = variant.split(":")
    runs = work / f"runs-{index}"
    command = [sys.executable, "-m", "karpathy_runner", "train", str(args.config), "--runs-dir", str(runs),
               "--quiet", *(["--nproc-per-node", "1"] if mode == "ddp" else [])]
    for setting in [f"data.root={work / 'data'}", "data.download=false", "data.val_fraction=0",
                    "train.best_metric=null", f"train.epochs={args.epochs}", f"train.device={args.device}",
                    f"data.batch_size={batch}", f"train.precision={precision}", "train.channels_last=false"]:
        command += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(work / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        return {"mode": mode, "variant": variant, "error": (done.stdout + done.stderr)[-2000:]}
    [folder] = [path for path in runs.iterdir() if not path.name.startswith(".")]
    meta = json.loads((folder / "meta.json").read_text())
    records = [r for r in map(json.loads, (folder / "metrics.jsonl").open()) if r["split"] == "train_epoch"]
    ends = [r["time"] for r in records]
    epochs = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
    # CIFAR-10's five synthetic files; another config's epoch in whole batches (its steps)
    samples = 5 * args.per_batch if "cifar" in args.config.name else records[0]["step"] * int(batch)
    return {"mode": mode, "variant": variant, "processes": meta.get("processes", 1),
            "backend": meta.get("backend"), "epoch_s": [round(e, 3) for e in epochs],
            "samples_per_s": round(samples / statistics.median(epochs[1:]), 1), "wall_s": round(wall, 2)}


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
    args = parser.parse_args()
    args.config = args.config.resolve()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        write_cifar10(work / "data", args.per_batch)
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(ACCEPT)
        for round_ in range(args.rounds):
            for variant in args.variants.split(","):
                # each round starts with the other mode: neither always runs on a warmer GPU
                for mode in (("plain", "ddp") if round_ % 2 == 0 else ("ddp", "plain")):
                    result = {"round": round_, **train(mode, variant, args, work, len(results))}
                    print(json.dumps(result), flush=True)
                    results.append(result)
    ratios = {}
    for variant in args.variants.split(","):
        by_round = [r for r in results if r["variant"] == variant and "samples_per_s" in r]
        plain = {r["round"]: r["samples_per_s"] for r in by_round if r["mode"] == "plain"}
        ddp = {r["round"]: r["samples_per_s"] for r in by_round if r["mode"] == "ddp"}
        each = [ddp[n] / plain[n] for n in range(args.rounds) if n in plain and n in ddp]
        if each:
            ratios[variant] = {"ddp_over_plain": [round(x, 4) for x in each],
                               "median": round(statistics.median(each), 4)}
            print(f"{variant}: DDP / plain samples/s per round {ratios[variant]['ddp_over_plain']}, "
                  f"median {ratios[variant]['median']}", flush=True)
    report = {"config": str(args.config.relative_to(ROOT)), "device": args.device, "epochs": args.epochs,
              "results": results, "ratios": ratios}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
