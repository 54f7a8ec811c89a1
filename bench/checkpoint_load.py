"""What verifying a checkpoint's checksums adds to loading it (kdl eval/sample/predict/resume).

    OMP_NUM_THREADS=1 python bench/checkpoint_load.py

A checkpoint of resnet18's size with Adam's moments (about 135 MB, transfer_resnet18's) and one of
the digits CNN's size: the median of 7 loads each way, the file in the page cache (the usual case
right after training, and the one where the extra read costs most in relative terms).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from karpathy_runner.runfolder import checkpoint


def state_of(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"models": {"model": model.state_dict()}, "optimizers": {"model": optimizer.state_dict()},
            "scaler": {}, "loop": {"epoch": 1, "batch": 0, "step": 1}, "task": {}, "window": [],
            "rng": {}}


def timed(load, path: Path, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 16, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    with tempfile.TemporaryDirectory() as folder:
        for name, model in (("resnet18", torchvision.models.resnet18()), ("digits cnn", small)):
            path = Path(folder) / f"{name}.pt"
            checkpoint.save_checkpoint([path], state_of(model))
            plain = timed(lambda p: torch.load(p, map_location="cpu", weights_only=True), path)
            checked = timed(checkpoint.load_checkpoint, path)
            print(f"{name}: {path.stat().st_size / 1e6:.2f} MB, torch.load {plain * 1e3:.1f} ms, "
                  f"kdl's load with its checks {checked * 1e3:.1f} ms (+{(checked - plain) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
