"""Loop overhead: kdl's trainer against a hand-written PyTorch loop, same model, same steps.

Both train the digits CNN of configs/digits_cnn.yaml (no scheduler, no validation, so that the
only difference is the loop) for the same number of steps, alternating in one process after a
warm-up; the tiny model makes any per-step cost of the loop show. kdl's side includes everything
a real run does: its step, metric windows, log lines and the checkpoints written at epoch ends.

    python bench/overhead.py [--steps 400] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from karpathy_runner.config import Config, load_config
from karpathy_runner.engine import Experiment, build_experiment, build_trainer
from karpathy_runner.models import build_model
from karpathy_runner.optim import build_optimizer
from karpathy_runner.progress import Reporter
from karpathy_runner.writer import RunWriter

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits_cnn.yaml"


def plain_loop(exp: Experiment, steps: int) -> float:
    """What one writes by hand: normalised tensors in memory, shuffle, slice, step."""
    cfg, info = exp.cfg, exp.data.info
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    images = (exp.data.train.images.float() / 255 - mean) / std
    labels = exp.data.train.labels
    done, started = 0, time.perf_counter()
    while done < steps:
        for index in torch.randperm(len(labels)).split(cfg.data.batch_size):
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return steps * cfg.data.batch_size / (time.perf_counter() - started)


def kdl_loop(cfg: Config, steps: int, root: Path) -> float:
    exp = build_experiment(cfg)
    writer = RunWriter.create(root, cfg.name, cfg.to_yaml())
    trainer = build_trainer(exp, writer, Reporter(quiet=True))
    started = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - started
    writer.close()
    assert trainer.state.step == steps
    return steps * cfg.data.batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["scheduler.name=none", "data.val_fraction=0", "train.best_metric=train.loss",
                 "train.device=cpu", "train.epochs=1000", f"train.max_steps={args.steps}"]
    cfg = load_config(CONFIG, overrides)
    exp = build_experiment(cfg)
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop(exp, 50), kdl_loop(cfg, args.steps, Path(tmp))  # warm-up
        for _ in range(args.rounds):
            plain.append(plain_loop(exp, args.steps))
            ours.append(kdl_loop(cfg, args.steps, Path(tmp)))
    p, k = statistics.median(plain), statistics.median(ours)
    # each round's two loops ran back to back: their ratio cancels most of the machine's drift
    ratios = [ours_round / plain_round for plain_round, ours_round in zip(plain, ours, strict=True)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps of "
          f"batch {cfg.data.batch_size}, {args.rounds} rounds (median)")
    print(f"plain PyTorch loop: {p:9.0f} samples/s   (rounds: {', '.join(f'{v:.0f}' for v in plain)})")
    print(f"kdl trainer:        {k:9.0f} samples/s   (rounds: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"ratio kdl/plain:    {k / p:9.3f}   (median of per-round ratios: "
          f"{statistics.median(ratios):.3f}; spread {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
