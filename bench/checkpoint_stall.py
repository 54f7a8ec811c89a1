"""What a checkpoint costs the training thread: K training steps right after `Trainer._save`
(the state copied on the training thread, torch.save and the write done by the checkpoint
thread, then waited for), against K steps with no checkpoint.

The steps are the case's model trained by hand on one batch, so that only the checkpoint's cost
differs; the two variants alternate within each round, in one process, so that the machine's
drift hits them alike. The figure is the median over the rounds of (time - time alone).

    python bench/checkpoint_stall.py [--case digits_cnn|seed_cnn] [--steps K] [--rounds N]
        [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from overhead import CASES, CIFAR_ROOT, CONFIGS
from synthetic_cifar import use_synthetic_cifar

from karpathy_runner.build import build_experiment, build_trainer
from karpathy_runner.config.loading import load_config
from karpathy_runner.models import build_model
from karpathy_runner.optim import build_optimizer
from karpathy_runner.runfolder.checkpoint import serialise
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.ui.progress import Reporter

WAYS = ("alone", "checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["digits_cnn", "seed_cnn"], default="digits_cnn")
    parser.add_argument("--steps", type=int, default=20, help="steps timed after each checkpoint")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    if args.case == "seed_cnn":
        use_synthetic_cifar(CIFAR_ROOT)
    cfg = load_config(CONFIGS / case.config, [*case.overrides, "train.device=cpu", "train.max_steps=30"])
    exp = build_experiment(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunWriter.create(Path(tmp), cfg.name, cfg.to_yaml())
        trainer = build_trainer(exp, run, Reporter(quiet=True))
        trainer.fit()  # a real state: the optimizer's moments and all
        state_bytes = len(serialise(trainer.state_dict()))
        model = build_model(cfg.model, exp.data.info)
        optimizer = build_optimizer(cfg.optimizer, model.parameters())
        x, y = trainer.feed.prepare(next(iter(trainer.feed.train.epoch(0))), None)

        def steps() -> None:
            for _ in range(args.steps):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        steps()
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        for round_ in range(args.rounds):
            for way in WAYS:
                started = time.perf_counter()
                if way == "checkpoint":
                    trainer._save("last", meta={"epochs_done": round_})
                steps()
                run.wait_for_checkpoint()
                times[way].append(time.perf_counter() - started)
        run.close()
    alone = statistics.median(times["alone"])
    print(f"{args.case}: torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, state "
          f"{state_bytes / 1e6:.2f} MB, {args.steps} steps after each checkpoint, {args.rounds} rounds")
    print(f"  {args.steps} steps alone: {alone * 1e3:.2f} ms")
    cost = statistics.median(times["checkpoint"]) - alone
    print(f"  a checkpoint costs training {cost * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
