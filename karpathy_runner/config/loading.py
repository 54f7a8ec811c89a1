"""Config files and overrides: safe YAML loading, `--set key.sub=value`, and validation into a
Config that reports every problem with its key path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, quoted, what_is
from . import safe_yaml
from .messages import describe, unknown_keys
from .root import Config, cross_problems, with_derived_defaults


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with safe loading; anything but a mapping is an error."""
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else f"is {what_is(path)}, not a file"
        raise ConfigError(
            [f"config file {str(path)!r} {what}; pass a YAML file such as configs/digits_cnn.yaml"]
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"]) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """A config's text (from `source`) as a mapping; anything else is a ConfigError."""
    try:
        raw = safe_yaml.parse(text)
    except safe_yaml.UnsafeYaml as exc:
        raise ConfigError([f"{source} {exc}. Fix the file; python tags are refused"]) from None
    if raw is None:
        raise ConfigError([f"{source} is empty; start from configs/digits_cnn.yaml"])
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{source} holds a {type(raw).__name__}, not a mapping of keys (name, data, model, ...)"]
        )
    return raw


SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def parse_override(text: str, option: str = "--set") -> tuple[list[str], Any]:
    """`optimizer.lr=0.1` -> (['optimizer', 'lr'], 0.1); the value is read as a YAML scalar/list,
    within the bounds of a config file's YAML (safe_yaml: aliases, nesting)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [f"{option} {quoted(text)} is malformed; write {option} key.sub=value, e.g. "
             f"{option} optimizer.lr=0.1"]
        )
    try:
        parsed = safe_yaml.parse(value) if value.strip() else ""
    except safe_yaml.TooLarge as exc:
        raise ConfigError([f"{option} {key}: the value {exc}"]) from None
    except safe_yaml.UnsafeYaml:
        raise ConfigError(
            [f"{option} {key}: the value {quoted(value)} is not a valid YAML scalar or list; quote "
             "it for the shell and close its brackets, e.g. --set 'model.channels=[16, 32]'"]
        ) from None
    if isinstance(parsed, str) and SCIENTIFIC.match(parsed):
        parsed = float(parsed)  # YAML 1.1 reads 1e-3 (no dot) as text; users mean a number
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key.sub=value` set (branches are created as needed)."""
    result = json.loads(json.dumps(raw, default=str)) if raw else {}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError([f"--set {text!r}: {where!r} is a value, not a branch with keys; "
                                   f"set it directly, e.g. --set {where}=VALUE"])
            node = child
        node[path[-1]] = value
    return result


def resolve(raw: dict[str, Any], source: str | None = None) -> Config:
    """Validate a raw mapping into a Config, reporting every problem with its key path."""
    raw = with_derived_defaults(raw)  # first: which task (and so which keys) this config means
    problems = unknown_keys(raw, Config, "")
    if problems:
        raise ConfigError(problems, source)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([describe(err) for err in exc.errors()], source) from None
    problems = cross_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    raw = apply_overrides(load_yaml(path), overrides or [])
    return resolve(raw, str(path))

