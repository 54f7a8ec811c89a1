"""Loop overhead: kdl's trainer against a hand-written PyTorch loop, same model, same steps.

Each case alternates the two loops in one process after a warm-up, so that the ratio of each
round cancels most of the machine's drift. The plain loop is what a skilled user writes: the
whole training set normalised once, resident on the device, a permutation per epoch, slices,
autocast under bf16/fp16 (with a gradient scaler for fp16), the same optimizer and layout.

- `digits_cnn`: the digits CNN of configs/digits_cnn.yaml (no scheduler, no validation, so that
  the only difference is the loop); the tiny model makes any per-step cost of the loop show.
- `digits_tiny`: the same with one conv channel (`model.channels=[1]`), a model that costs next
  to nothing, so that the figure is the loop's own cost per step (with its epoch-end checkpoints).
- `seed_cnn`: the seed CNN of configs/cifar_cnn.yaml (SGD, no augmentation, no scheduler, no
  validation) on synthetic CIFAR-10 written in the real file format (bench/synthetic_cifar.py).
- `char_lstm`: the 2x256 LSTM of configs/stdlib_char_lstm.yaml on the first 400,000 characters
  of the standard library, the same windows in the same order, the hidden state carried from
  batch to batch, gradients clipped at 5 (a val split of 400 characters, so that the one
  epoch-end validation costs next to nothing; no epoch-end sample).

kdl's side includes everything a real run does: its step, metric windows, log lines and the
checkpoint written at the end.

    python bench/overhead.py [--case digits_cnn|digits_tiny|seed_cnn|char_lstm|all] [--steps N] [--rounds R]
        [--threads N] [--device cpu|cuda] [--precision fp32|bf16|fp16] [--batch-size N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from synthetic_cifar import use_synthetic_cifar

from karpathy_runner.build import Experiment, build_experiment, build_trainer
from karpathy_runner.config.loading import load_config
from karpathy_runner.config.root import Config
from karpathy_runner.models import build_model
from karpathy_runner.optim import build_optimizer
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.ui.progress import Reporter
from karpathy_runner.updater import PRECISIONS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CIFAR_ROOT = Path(tempfile.gettempdir()) / "kdl-bench-cifar"


def plain_cnn(exp: Experiment, steps: int) -> float:
    """What one writes by hand: normalised tensors on the device, shuffle, slice, step."""
    cfg, info, device = exp.cfg, exp.data.info, exp.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info).to(device)
    if device.type == "cuda":  # the layout kdl picks for conv nets there
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    dtype = PRECISIONS[cfg.train.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    images = (exp.data.train.images.to(device).float() / 255 - mean) / std
    labels = exp.data.train.labels.to(device)
    done, started = 0, time.perf_counter()
    while done < steps:
        for index in torch.randperm(len(labels), device=device).split(cfg.data.batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done += 1
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * cfg.data.batch_size / (time.perf_counter() - started)


def plain_char_lstm(exp: Experiment, steps: int) -> float:
    """char-rnn by hand: consecutive windows of every stream, the state carried, clipped."""
    cfg, corpus = exp.cfg, exp.data.train
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, exp.data.info)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    batch, hidden = cfg.data.batch_size, None
    started = time.perf_counter()
    for step in range(steps):
        x, y = corpus.get_batch(torch.arange(step * batch, (step + 1) * batch))  # (B, T)
        logits, hidden = model(x, hidden)
        hidden = tuple(h.detach() for h in hidden)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
    if exp.device.type == "cuda":
        torch.cuda.synchronize(exp.device)
    return steps * batch * cfg.data.seq_len / (time.perf_counter() - started)


@dataclass
class Case:
    config: str
    overrides: list[str]
    plain: Callable[[Experiment, int], float]
    items_per_step: Callable[[Config], int]  # samples (images) or characters
    unit: str
    default_steps: int


CASES = {
    "digits_cnn": Case("digits_cnn.yaml",
                       ["scheduler.name=none", "data.val_fraction=0", "train.best_metric=train.loss"],
                       plain_cnn, lambda cfg: cfg.data.batch_size, "samples/s", 400),
    "digits_tiny": Case("digits_cnn.yaml",
                        ["scheduler.name=none", "data.val_fraction=0", "train.best_metric=train.loss",
                         "model.channels=[1]"],
                        plain_cnn, lambda cfg: cfg.data.batch_size, "samples/s", 2000),
    "seed_cnn": Case("cifar_cnn.yaml",
                     ["scheduler.name=none", "data.val_fraction=0", "train.best_metric=train.loss",
                      "data.augment=[]", f"data.root={CIFAR_ROOT}", "data.download=false"],
                     plain_cnn, lambda cfg: cfg.data.batch_size, "samples/s", 300),
    "char_lstm": Case("stdlib_char_lstm.yaml",
                      ["scheduler.name=none", "data.max_chars=400000", "data.val_fraction=0.001",
                       "data.eval_batch_size=1", "task.sample_length=0"],
                      plain_char_lstm, lambda cfg: cfg.data.batch_size * cfg.data.seq_len, "chars/s",
                      150),
}


def kdl_loop(cfg: Config, steps: int, root: Path, per_step: int) -> float:
    exp = build_experiment(cfg)
    writer = RunWriter.create(root, cfg.name, cfg.to_yaml())
    trainer = build_trainer(exp, writer, Reporter(quiet=True))
    started = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - started
    writer.close()
    assert trainer.state.step == steps
    return steps * per_step / elapsed


def run_case(name: str, steps: int, rounds: int, args: argparse.Namespace) -> None:
    case = CASES[name]
    if name == "seed_cnn":
        use_synthetic_cifar(CIFAR_ROOT)
    overrides = [*case.overrides, f"train.device={args.device}", f"train.precision={args.precision}",
                 "train.epochs=1000", f"train.max_steps={steps}"]
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    cfg = load_config(CONFIGS / case.config, overrides)
    exp = build_experiment(cfg)
    per_step = case.items_per_step(cfg)
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        case.plain(exp, max(steps // 8, 2)), kdl_loop(cfg, steps, Path(tmp), per_step)  # warm-up
        for _ in range(rounds):
            plain.append(case.plain(exp, steps))
            ours.append(kdl_loop(cfg, steps, Path(tmp), per_step))
    p, k = statistics.median(plain), statistics.median(ours)
    # each round's two loops ran back to back: their ratio cancels most of the machine's drift
    ratios = [o / q for q, o in zip(plain, ours, strict=True)]
    where = (torch.cuda.get_device_name(exp.device) if exp.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{name}: torch {torch.__version__}, {where}, {cfg.train.precision}, {steps} steps of "
          f"{per_step} {case.unit.split('/')[0]}, {rounds} rounds (median)")
    print(f"  plain PyTorch loop: {p:9.0f} {case.unit}   (rounds: {', '.join(f'{v:.0f}' for v in plain)})")
    print(f"  kdl trainer:        {k:9.0f} {case.unit}   (rounds: {', '.join(f'{v:.0f}' for v in ours)})")
    low, high = median_interval(ratios)
    print(f"  ratio kdl/plain:    {k / p:9.3f}   (median of per-round ratios: "
          f"{statistics.median(ratios):.3f}, 95 % interval {low:.3f}-{high:.3f}; "
          f"spread {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"  per step:           plain {per_step / p * 1e6:.0f} us, kdl {per_step / k * 1e6:.0f} us "
          f"(+{(per_step / k - per_step / p) * 1e6:.0f} us)")


def median_interval(values: list[float], draws: int = 4000) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median of `values`: how far the median of per-round
    ratios could move were the bench run again on an equally noisy machine (more rounds
    narrow it)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per loop (default: 400 digits_cnn, 2000 digits_tiny, 300 seed_cnn, "
                             "150 char_lstm)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the config's (32 digits, 64 seed CNN, 128 char LSTM)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in CASES if args.case == "all" else [args.case]:
        run_case(name, args.steps or CASES[name].default_steps, args.rounds, args)


if __name__ == "__main__":
    main()
