"""The seed CNN with its bugs fixed; optimizers and schedules; precision on the CPU."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from kdl import train_tiny

from karpathy_runner.config.models import CNNConfig
from karpathy_runner.config.training import OptimizerConfig, SchedulerConfig
from karpathy_runner.data.image_sets import augment_batch
from karpathy_runner.models import build_model
from karpathy_runner.optim import LRSchedule, build_optimizer

CIFAR = types.SimpleNamespace(in_channels=3, image_size=(32, 32), num_classes=10)


def test_default_cnn_is_the_seed_network_with_padding_and_raw_logits():
    model = build_model(CNNConfig(), CIFAR)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    assert [(f.in_features, f.out_features) for f in linears] == [(64 * 8 * 8, 10)]
    seed_params = (3 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 8 * 8 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == seed_params
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10) and (logits < 0).any()  # no ReLU on the logits


def test_cnn_options_change_the_network():
    cfg = CNNConfig(channels=[4, 8, 16], kernel_size=5, batch_norm=True, pool="avg", dropout=0.2,
                    hidden=[32])
    model = build_model(cfg, types.SimpleNamespace(in_channels=1, image_size=(28, 28), num_classes=7))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm2d", "AvgPool2d", "Dropout"} <= kinds
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_each_optimizer_takes_a_step(name):
    model = torch.nn.Linear(3, 1)
    before = model.weight.detach().clone()
    optimizer = build_optimizer(OptimizerConfig(name=name, lr=0.1, weight_decay=0.01), model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_schedules():
    warm = LRSchedule(SchedulerConfig(name="cosine", warmup_epochs=1, min_lr=0.01), 0.1, 10, 100)
    assert warm.lr(0) == pytest.approx(0.01) and warm.lr(9) == pytest.approx(0.1)
    assert warm.lr(99) == pytest.approx(0.01, abs=1e-4)
    step = LRSchedule(SchedulerConfig(name="step", step_size=2, gamma=0.5), 1.0, 10, 100)
    assert [step.lr(s) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    one = LRSchedule(SchedulerConfig(name="onecycle", pct_start=0.25), 1.0, 10, 100)
    assert one.lr(0) == pytest.approx(1 / 25) and one.lr(25) == pytest.approx(1.0)
    assert one.lr(100) == pytest.approx(1 / 25 / 1e4)
    none = LRSchedule(SchedulerConfig(), 0.3, 10, 100)
    assert {none.lr(s) for s in range(100)} == {0.3}


def test_augmentation_crops_and_flips_deterministically():
    """The same generator, the same augmentation; the crop pads with zeros (test_guards checks
    that the flip mirrors some images and not others)."""
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    first = augment_batch(x, ("crop", "flip"), 1, torch.Generator().manual_seed(3))
    again = augment_batch(x, ("crop", "flip"), 1, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and first.shape == x.shape
    shifted = augment_batch(torch.ones(64, 1, 4, 4), ("crop",), 2, torch.Generator().manual_seed(0))
    assert (shifted == 0).any() and (shifted == 1).any()  # zero padding shows at the borders


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    result = train_tiny(tmp_path, "--set", f"train.precision={precision}", "--set", "train.epochs=1",
                        "--set", "train.grad_clip=1.0", "--set", "optimizer.name=sgd",
                        "--set", "optimizer.lr=0.05", "--set", "optimizer.momentum=0.9",
                        "--set", "optimizer.nesterov=true")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / result.last_line / "summary.json").read_text())
    assert math.isfinite(summary["final"]["val.loss"])


def test_fp16_on_cpu_is_refused(tmp_path):
    result = train_tiny(tmp_path, "--set", "train.precision=fp16")
    assert result.exit_code == 2 and "fp16" in result.stderr
