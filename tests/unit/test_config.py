"""Configs: every shipped config validates; overrides parse as YAML; each mistake names its key."""

from __future__ import annotations

import pytest
import yaml
from kdl import CONFIGS, kdl

from karpathy_runner.config.loading import apply_overrides, load_config, parse_override, resolve
from karpathy_runner.config.root import Config
from karpathy_runner.errors import ConfigError

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs_to_check():
    names = {p.name for p in ALL_CONFIGS}
    assert {"cifar_cnn.yaml", "mnist_cnn.yaml", "fashion_mnist_cnn.yaml", "digits_cnn.yaml",
            "digits_rows_lstm.yaml", "stdlib_char_lstm.yaml", "shakespeare_char_lstm.yaml",
            "imdb_lstm.yaml", "digits_gan.yaml", "mnist_dcgan.yaml", "cifar_dcgan.yaml"} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_validates_and_starts_with_its_command(path):
    cfg = load_config(path)
    command = f"# kdl train configs/{path.relative_to(CONFIGS)}"
    first = path.read_text().splitlines()[0]
    assert first == command or first.startswith(f"{command} --set data.")  # own data: its path
    # the resolved config round-trips through YAML to the same experiment
    assert resolve(yaml.safe_load(cfg.to_yaml())).hash() == cfg.hash()


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_says_how_its_settings_were_chosen(path):
    """As airbench does: the search that chose them (its command, result and machine), or why
    none could run where kdl is developed."""
    header = " ".join(line[1:].strip() for line in path.read_text().splitlines()
                      if line.startswith("#"))
    if "Not tuned:" not in header:
        assert "Tuned with kdl's own" in header and f"kdl sweep configs/{path.name}" in header
        assert "CPU cores" in header and "torch 2." in header  # the machine
        assert any(c.isdigit() for c in header.split("kdl sweep", 1)[1])  # its results


def test_cifar_config_is_the_seed_experiment():
    cfg = load_config(CONFIGS / "cifar_cnn.yaml")
    assert (cfg.data.name, cfg.data.batch_size) == ("cifar10", 64)
    assert (cfg.model.name, cfg.model.channels, cfg.model.kernel_size, cfg.model.hidden) == (
        "cnn", [32, 64], 3, [])
    assert cfg.model.pool == "max"


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("optimizer.lr=0.1", ["optimizer", "lr"], 0.1),
        ("train.epochs=3", ["train", "epochs"], 3),
        ("model.channels=[16, 32]", ["model", "channels"], [16, 32]),
        ("train.grad_clip=null", ["train", "grad_clip"], None),
        ("data.download=false", ["data", "download"], False),
        ("name=my-run", ["name"], "my-run"),
        ("optimizer.lr=1e-3", ["optimizer", "lr"], 1e-3),
        ("data.root=a=b", ["data", "root"], "a=b"),
    ],
)
def test_override_values_parse_as_yaml(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_create_branches_and_leave_the_original_alone():
    raw = {"optimizer": {"lr": 0.1}}
    out = apply_overrides(raw, ["optimizer.lr=0.5", "train.early_stopping.patience=2"])
    assert out == {"optimizer": {"lr": 0.5}, "train": {"early_stopping": {"patience": 2}}}
    assert raw == {"optimizer": {"lr": 0.1}}
    cfg = resolve(out)
    assert cfg.optimizer.lr == 0.5 and cfg.train.early_stopping.patience == 2


def test_defaults_exist_for_every_key():
    cfg = resolve({})
    assert isinstance(cfg, Config)
    assert cfg.data.name == "digits" and cfg.model.name == "cnn" and cfg.optimizer.lr > 0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lrr=0.1", ["optimizer.lrr", "unknown key", "Did you mean 'optimizer.lr'"]),
        ("trian.epochs=1", ["trian", "Did you mean 'train'"]),
        ("train.epochs=ten", ["train.epochs", "integer", "'ten'"]),
        ("optimizer.lr=0", ["optimizer.lr", "greater than 0"]),
        ("optimizer.lr=-0.1", ["optimizer.lr", "greater than 0", "-0.1"]),
        ("data.batch_size=0", ["data.batch_size", "greater than or equal to 1"]),
        ("train.epochs=0", ["train.epochs", "greater than or equal to 1"]),
        ("model.name=resnet", ["model.name", "unknown model 'resnet'", "cnn"]),
        ("data.name=imagenet", ["data.name", "unknown dataset", "cifar10", "mnist"]),
        ("optimizer.name=lion", ["optimizer.name", "sgd, adam, adamw, rmsprop"]),
        ("train.device=gpu", ["train.device", "cuda:N"]),
        ("model.kernel_size=4", ["model.kernel_size", "odd"]),
        ("optimizer.nesterov=true", ["optimizer.nesterov", "momentum"]),
    ],
)
def test_config_errors_name_the_key_and_exit_2(override, expected):
    result = kdl("validate", CONFIGS / "digits_cnn.yaml", "--set", override)
    assert result.exit_code == 2
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        resolve({"optimizer": {"lr": -1}, "train": {"epochs": 0}})
    assert len(info.value.problems) == 2


@pytest.mark.parametrize(
    "content, expected",
    [("", "is empty"), ("- a\n- b\n", "holds a list"), ("!!python/object:os.system {}\n", "python tags"),
     ("a: [1,\n", "not valid YAML")],
)
def test_bad_yaml_files(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = kdl("validate", path)
    assert result.exit_code == 2 and expected in result.stderr


def test_validate_prints_the_resolved_config():
    result = kdl("validate", CONFIGS / "digits_cnn.yaml", "--set", "optimizer.lr=0.5")
    assert result.exit_code == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optimizer"]["lr"] == 0.5
    assert resolved["train"]["precision"] == "fp32"  # defaults are filled in


def test_malformed_set_is_an_error():
    result = kdl("validate", CONFIGS / "digits_cnn.yaml", "--set", "optimizer.lr")
    assert result.exit_code == 2 and "key.sub=value" in result.stderr
