"""Hostile configs: aliases that expand to billions of values, deep nesting, bytes that are not
UTF-8, a name with a newline. Each is exit 2 with a message, fast, with nothing written."""

from __future__ import annotations

import time

import pytest
from kdl import kdl

from karpathy_runner.config import load_config
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
     ["not valid YAML"]),
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
