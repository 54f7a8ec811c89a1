"""Hostile configs: aliases that expand to billions of values, deep nesting, bytes that are not
UTF-8, a name with a newline. Each is exit 2 with a message, fast, with nothing written."""

from __future__ import annotations

import time

import pytest
from kdl import CONFIGS, TINY, kdl
from stopping import sets

from karpathy_runner.config.loading import load_config
from karpathy_runner.errors import ConfigError


def laughs(levels: int) -> str:
    """The billion-laughs document: each level nine aliases of the one before."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        name, previous = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [{','.join(['*' + previous] * 9)}]")
    return "\n".join(lines) + "\n"


def block_nesting(depth: int) -> str:
    return "".join(f"{'  ' * i}k{i}:\n" for i in range(depth)) + f"{'  ' * depth}leaf\n"


CASES = [
    ("billion laughs", laughs(9).encode(), ["aliases", "expand to more than"]),
    ("ten levels of laughs", laughs(10).encode(), ["aliases", "expand to more than"]),
    ("flow nesting 100000 deep", ("a: " + "[" * 100_000 + "]" * 100_000).encode(),
     ["nests more than 100 levels"]),  # libyaml stops at 1,000; the same words as kdl's bound
    ("block nesting 500 deep", block_nesting(500).encode(), ["nests more than 100 levels"]),
    ("latin-1 bytes", "name: caf\u00e9\n".encode("latin-1"), ["is not UTF-8 text", "save it as UTF-8"]),
    ("name with a trailing newline", b'name: "evil\\n"\n', ["name: must be letters"]),
]


@pytest.mark.parametrize("case, text, fragments", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_config_is_refused_fast(tmp_path, case, text, fragments):
    config = tmp_path / "hostile.yaml"
    config.write_bytes(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert time.perf_counter() - started < 0.5, case
    for fragment in fragments:
        assert fragment in str(refused.value), (fragment, str(refused.value))
    for command in (["validate", config], ["train", config, "--runs-dir", tmp_path / "runs"]):
        result = kdl(*command)
        assert result.exit_code == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr and fragments[0] in result.stderr
    assert not (tmp_path / "runs").exists()


def test_small_aliases_still_work(tmp_path):
    config = tmp_path / "aliases.yaml"
    config.write_text("name: x\ndata: {name: digits, batch_size: 32}\n"
                      "model: {name: cnn, channels: [&width 8, *width]}\n")
    assert load_config(config).model.channels == [8, 8]


# ----------------------------------------------------------------------------- values that cannot run


@pytest.mark.parametrize("value, fragments", [
    ("seed=1180591620717411303424", ["seed: must be less than 9223372036854775808"]),
    ("data.split_seed=-9223372036854775809", ["data.split_seed: must be greater than or equal"]),
    ("model.hidden=[10000000000]", ["parameters", "model.hidden=[10000000000]"]),
    ("data.crop_padding=100000", ["data.crop_padding: 100000 pads each batch"]),
], ids=["seed 2**70", "split seed below -2**63", "a layer of 10**10 units", "crop padding 10**5"])
def test_values_that_validate_but_cannot_run_are_refused_before_a_folder(tmp_path, value, fragments):
    result = kdl("train", CONFIGS / "digits_cnn.yaml", *sets([*TINY, "data.augment=[crop]", value]),
                 "--runs-dir", tmp_path / "runs", "--quiet")
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("seed", [10**14, 2**63 - 1, -(2**63)])
def test_a_large_seed_trains(tmp_path, seed):
    result = kdl("train", CONFIGS / "digits_cnn.yaml",
                 *sets([*TINY, "train.max_steps=2", "data.augment=[crop,flip]", "data.num_workers=0",
                        f"seed={seed}"]), "--runs-dir", tmp_path, "--quiet")
    assert result.exit_code == 0, result.stderr


def test_the_batch_order_of_a_seed_is_what_it_was():
    """Seeds that fit kept their orders (runs stopped by an older kdl resume exactly)."""
    import torch

    from karpathy_runner.data import epoch_order

    assert torch.equal(epoch_order(50, 7, 3, True),
                       torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1_000_003 + 3)))


def test_eval_device_goes_through_the_device_check(trained):
    result = kdl("eval", trained.name, "--device", "bogus", "--runs-dir", trained.parent)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "--device: must be one of auto, cpu, cuda, cuda:N, mps; got 'bogus'" in result.stderr
