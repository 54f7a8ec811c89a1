"""The data path alone: batches of synthetic CIFAR-10 (real file format) delivered to the device
and prepared (scaled, augmented with crop and flip, normalised), resident vs streamed.

- `device`: the uint8 training set lives on the device; each batch is cut there.
- `stream, N workers`: batches are gathered on the host (by N DataLoader workers, into pinned
  memory towards a GPU) and copied over, as for data that does not fit.

Each placement reads the same batches in the same order (tests check they are identical);
rounds alternate the placements so that the machine's drift hits them alike.

    python bench/data_path.py [--device cpu|cuda] [--batch-size 512] [--workers 0,2,4]
        [--epochs 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from synthetic_cifar import use_synthetic_cifar

from karpathy_runner.build import build_experiment, streaming
from karpathy_runner.config.loading import load_config
from karpathy_runner.data import Batches

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CIFAR_ROOT = Path(tempfile.gettempdir()) / "kdl-bench-cifar"


def batches_per_s(placement: str, workers: int, args: argparse.Namespace) -> float:
    """Samples per second over `args.epochs` epochs of prepared training batches."""
    cfg = load_config(CONFIGS / "cifar_cnn.yaml", [
        f"data.root={CIFAR_ROOT}", "data.download=false", f"data.batch_size={args.batch_size}",
        f"data.placement={placement}", f"data.num_workers={workers}",
        f"train.device={args.device}"])
    exp = build_experiment(cfg)
    batches = Batches(exp.data.train, cfg.data.batch_size, seed=cfg.seed, shuffle=True,
                      **streaming(exp))
    checksum = torch.zeros((), device=exp.device)
    samples, step, started = 0, 0, time.perf_counter()
    for epoch in range(args.epochs):
        for batch in batches.epoch(epoch):
            x, y = exp.prepare(batch, step)
            checksum += x[0, 0, 0, 0]  # uses the batch, without a sync per step
            samples, step = samples + len(y), step + 1
    float(checksum)  # waits for the device
    return samples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts to stream with")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    use_synthetic_cifar(CIFAR_ROOT)
    paths = [("device", 0)] + [("stream", int(n)) for n in args.workers.split(",")]
    figures: dict[tuple[str, int], list[float]] = {path: [] for path in paths}
    for placement, workers in paths:  # warm-up: first kernels, page cache, the dataset cache
        batches_per_s(placement, workers, argparse.Namespace(**{**vars(args), "epochs": 1}))
    for _ in range(args.rounds):
        for placement, workers in paths:
            figures[placement, workers].append(batches_per_s(placement, workers, args))
    print(f"data path: synthetic CIFAR-10, batch {args.batch_size}, crop+flip, {args.epochs} "
          f"epoch(s), {args.device}, torch {torch.__version__}, {args.rounds} rounds (median)")
    resident = statistics.median(figures["device", 0])
    for (placement, workers), values in figures.items():
        name = "device (resident)" if placement == "device" else f"stream, {workers} workers"
        median = statistics.median(values)
        print(f"  {name:20s} {median:10.0f} samples/s   {median / resident:5.2f}x resident   "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
