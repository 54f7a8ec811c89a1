"""What a checkpoint costs the training thread: K training steps right after `Trainer._save`
(the state taken, the write handed to the checkpoint thread, then waited for), against K steps
with no checkpoint, for both ways of taking the state (checkpoint.snapshot):

- `at once`: serialised on the training thread (kdl's choice for a state on the CPU of at most
  checkpoint.AT_ONCE_BYTES);
- `thread`: copied on the training thread and serialised by the checkpoint thread.

The steps are the case's model trained by hand on one batch, so that only the checkpoint's cost
differs; the three variants alternate within each round, in one process, so that the machine's
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

import karpathy_runner.checkpoint as checkpoint
from karpathy_runner.config import load_config
from karpathy_runner.engine import build_experiment, build_trainer
from karpathy_runner.models import build_model
from karpathy_runner.optim import build_optimizer
from karpathy_runner.progress import Reporter
from karpathy_runner.writer import RunWriter

WAYS = {"alone": None, "at once": checkpoint.AT_ONCE_BYTES, "thread": 0}


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
        state_bytes = sum(t.nbytes for t in checkpoint._tensors(trainer.state_dict()))
        model = build_model(cfg.model, exp.data.info)
        optimizer = build_optimizer(cfg.optimizer, model.parameters())
        x, y = trainer.prepare(next(iter(trainer.train_batches.epoch(0))), None)

        def steps() -> None:
            for _ in range(args.steps):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        steps()
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        for round_ in range(args.rounds):
            for way, at_once_bytes in WAYS.items():
                started = time.perf_counter()
                if at_once_bytes is not None:
                    checkpoint.AT_ONCE_BYTES = at_once_bytes
                    trainer._save("last", meta={"epochs_done": round_})
                steps()
                run.wait_for_checkpoint()
                times[way].append(time.perf_counter() - started)
        run.close()
    alone = statistics.median(times["alone"])
    print(f"{args.case}: torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, state "
          f"{state_bytes / 1e6:.2f} MB, {args.steps} steps after each checkpoint, {args.rounds} rounds")
    print(f"  {args.steps} steps alone: {alone * 1e3:.2f} ms")
    for way in ("at once", "thread"):
        cost = statistics.median(times[way]) - alone
        print(f"  a checkpoint taken {way:8s} costs training {cost * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
