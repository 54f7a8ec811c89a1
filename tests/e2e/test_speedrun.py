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
    evaluated = kdl("eval", folder, "--split", "test", "--json", "--runs-dir", runs)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert '"accuracy"' in evaluated.stdout and '"samples": 20' in evaluated.stdout


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
