"""Training speed of the seed CNN and the CIFAR speedrun config, per precision and layout.

Each variant trains a real kdl run (the trainer, its logging and checkpoints) for `--epochs`
epochs on synthetic CIFAR-10 in the real file format (bench/synthetic_cifar.py; no download,
no validation split) and reports the first epoch's time (warm-up, autotuning, compiling) apart
from the later ones, samples per second over the later epochs, the peak device memory and
torch.compile's first-step time. Everything goes into one JSON file.

Variants: fp32, bf16, bf16_cl (channels last), bf16_cl_compile (and torch.compile).

    python bench/gpu.py [--device cuda] [--epochs 3] [--out gpu.json] [--per-batch 10000]
        [--variants fp32,bf16,bf16_cl,bf16_cl_compile] [--configs cifar_cnn,cifar_speedrun]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from synthetic_cifar import use_synthetic_cifar

from karpathy_runner.build import build_experiment, build_trainer, versions
from karpathy_runner.config.loading import load_config
from karpathy_runner.errors import RunFailed
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.ui.progress import Reporter

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
VARIANTS = {
    "fp32": ["train.precision=fp32", "train.channels_last=false"],
    "bf16": ["train.precision=bf16", "train.channels_last=false"],
    "bf16_cl": ["train.precision=bf16", "train.channels_last=true"],
    "bf16_cl_compile": ["train.precision=bf16", "train.channels_last=true", "train.compile=true"],
}


def train_variant(config: str, variant: str, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    cfg = load_config(CONFIGS / f"{config}.yaml", [
        *VARIANTS[variant], f"data.root={args.data}", "data.download=false",
        "data.val_fraction=0", "train.best_metric=null", f"train.epochs={args.epochs}",
        f"train.device={args.device}",
    ])
    exp = build_experiment(cfg)
    if exp.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(exp.device)
    writer = RunWriter.create(runs, f"{config}-{variant}", cfg.to_yaml())
    trainer = build_trainer(exp, writer, Reporter(quiet=True))
    started = time.perf_counter()
    try:
        trainer.fit()
    except RunFailed as exc:  # e.g. a non-finite loss: recorded, and the other variants still run
        return {"config": config, "variant": variant, "error": str(exc)}
    finally:
        writer.close()
    wall = time.perf_counter() - started
    # the loop logs each epoch's end as seconds since it began: differences are epoch times
    ends = [r["time"] for r in map(json.loads, (writer.folder / "metrics.jsonl").open())
            if r["split"] == "train_epoch"]
    epochs = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
    later = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
    peak = torch.cuda.max_memory_allocated(exp.device) if exp.device.type == "cuda" else None
    return {
        "config": config, "variant": variant, "batch_size": cfg.data.batch_size,
        "train_samples": len(exp.data.train), "epochs": len(epochs),
        "first_epoch_s": round(epochs[0], 3), "later_epoch_s": round(later, 3),
        "samples_per_s": round(len(exp.data.train) / later, 1),
        "peak_memory_mib": round(peak / 2**20, 1) if peak is not None else None,
        "compile_s": writer.meta.get("compile_s"), "wall_s": round(wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "kdl-bench-cifar")
    parser.add_argument("--per-batch", type=int, default=10_000,
                        help="synthetic images per CIFAR file (5 train files, 1 test file)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--configs", default="cifar_cnn,cifar_speedrun")
    args = parser.parse_args()
    use_synthetic_cifar(args.data, args.per_batch)
    results = []
    with tempfile.TemporaryDirectory() as runs:
        for config in args.configs.split(","):
            for variant in args.variants.split(","):
                result = train_variant(config, variant, args, Path(runs))
                print(json.dumps(result), flush=True)
                results.append(result)
    device = torch.device(args.device)
    report = {"device": versions(device)["device_name"], "versions": versions(device),
              "python": platform.python_version(), "data": "synthetic CIFAR-10 (real file format)",
              "results": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
