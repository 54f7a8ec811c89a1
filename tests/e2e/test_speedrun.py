"""configs/cifar_speedrun.yaml and its model: trains on CIFAR-format files, evaluates with
test-time flip averaging, gives batch-norm shifts their own learning rate."""

from __future__ import annotations

import types

import torch
from datafiles import write_cifar10
from kdl import CONFIGS, kdl
from stopping import final_state, read_json

from karpathy_runner.config.models import SpeedrunConfig
from karpathy_runner.config.tasks import ClassifyConfig
from karpathy_runner.models import build_model
from karpathy_runner.tasks.classify import Classify

CIFAR = types.SimpleNamespace(in_channels=3, image_size=(32, 32), num_classes=10,
                              class_names=[str(i) for i in range(10)], vocabulary=[])


def test_speedrun_config_trains_on_cifar_files_and_evaluates_the_test_split(tmp_path, skip_md5):
    write_cifar10(tmp_path / "data", per_batch=20)
    runs = tmp_path / "runs"
    sets = ["data.root=" + str(tmp_path / "data"), "data.download=false", "data.batch_size=32",
            "data.eval_batch_size=8", "train.max_steps=3", "train.device=cpu"]
    result = kdl("train", CONFIGS / "cifar_speedrun.yaml", *[a for s in sets for a in ("--set", s)],
                 "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.stderr
    folder = runs / result.last_line
    assert read_json(folder / "summary.json")["steps"] == 3
    state = final_state(folder)
    groups = state["optimizers"]["model"]["param_groups"]
    # Nesterov SGD; batch-norm shifts at 64x the weights' lr
    assert all(g["nesterov"] and g["momentum"] == 0.85 for g in groups)
    assert [g["lr_scale"] for g in groups] == [1.0, 64.0]
    assert abs(groups[1]["lr"] - 64 * groups[0]["lr"]) < 1e-9
    # and the shifts decay at the weights' rate per step: their weight decay is 64x smaller
    assert groups[0]["weight_decay"] == 1.33e-3 and abs(groups[1]["weight_decay"] - 1.33e-3 / 64) < 1e-12
    evaluated = kdl("eval", folder, "--split", "test", "--json", "--runs-dir", runs)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert '"accuracy"' in evaluated.stdout and '"samples": 20' in evaluated.stdout


def test_the_speedrun_config_decays_and_steps_as_airbench94_per_example():
    """airbench94 (hyp: lr 11.5, weight_decay 0.0153, batch 1024, momentum 0.85, bias_scaler 64)
    passes torch's SGD, on a loss summed over the batch, lr = 11.5 / K and weight_decay = wd / lr
    with K = 1024 (1 + 1 / (1 - momentum)) and wd = 0.0153 * 1024 / K: each weight decays by
    lr * weight_decay = wd per step, the shifts too (their weight_decay is wd / (64 lr)). kdl's
    loss is the batch mean: the same steps need lr * 1024, the same decay per step."""
    from karpathy_runner.config.loading import load_config
    from karpathy_runner.optim import build_optimizer

    batch, momentum, bias_scaler = 1024, 0.85, 64.0
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr_summed = 11.5 / kilostep
    decay_per_step = 0.0153 * batch / kilostep  # wd: the fraction of a weight removed per step
    airbench = [  # (lr on the summed loss, torch weight_decay) of the weights, then the shifts
        (lr_summed, decay_per_step / lr_summed),
        (lr_summed * bias_scaler, decay_per_step / (lr_summed * bias_scaler)),
    ]
    assert abs(decay_per_step - 2.0e-3) < 1e-5

    cfg = load_config(CONFIGS / "cifar_speedrun.yaml", ["train.device=cpu"])
    assert (cfg.data.batch_size, cfg.optimizer.momentum, cfg.model.bias_lr_scale) == (
        batch, momentum, bias_scaler)
    task = Classify(cfg.task, cfg.model, CIFAR, torch.device("cpu"))
    groups = build_optimizer(cfg.optimizer, task.param_groups("model")).param_groups
    assert len(groups) == 2
    for group, (lr, weight_decay) in zip(groups, airbench, strict=True):
        group_lr = group["lr"] * group["lr_scale"]  # as the loop sets it
        # the same step on a mean loss as airbench's on the summed loss
        assert abs(group_lr / batch - lr) / lr < 0.01
        # the same fraction of each weight decayed per step (3 significant digits in the config)
        assert abs(group_lr * group["weight_decay"] - lr * weight_decay) / (lr * weight_decay) < 0.002


def test_speedrun_network_shapes_and_initialisation():
    model = build_model(SpeedrunConfig(), CIFAR)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 7 and not any(n.weight.requires_grad for n in norms)
    assert norms[0].momentum == 0.4
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    first = convs[0].weight  # 24 -> 64: identity on the 24 shared channels
    assert torch.equal(first[:24, :24, 1, 1], torch.eye(24))
    assert first[:24, :24, 0, 0].abs().sum() == 0


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    plain = Classify(ClassifyConfig(), SpeedrunConfig(), CIFAR, torch.device("cpu"))
    flipped = Classify(ClassifyConfig(eval_flip=True), SpeedrunConfig(), CIFAR, torch.device("cpu"))
    flipped.model.load_state_dict(plain.model.state_dict())
    plain.train(False), flipped.train(False)
    with torch.no_grad():
        both = (plain.model(images) + plain.model(images.flip(3))) / 2
    expected = torch.nn.functional.cross_entropy(both, labels)
    assert torch.allclose(flipped.eval_step((images, labels)).losses["loss"], expected)
    assert not torch.allclose(plain.eval_step((images, labels)).losses["loss"], expected)


def test_eval_flip_needs_images(tmp_path):
    result = kdl("validate", CONFIGS / "digits_rows_lstm.yaml", "--set", "task.eval_flip=true")
    assert result.exit_code == 2
    assert "task.eval_flip" in result.stderr + result.stdout
