"""Nested mappings as the dotted names used everywhere (`--set optimizer.lr=0.1`, compare columns,
sweep grids, metrics filters), and the values of flat ones. Pure Python: imported by commands
that must start fast."""

from __future__ import annotations

import json
from typing import Any

MISSING = object()  # a key a tree does not have (None is a real value in configs)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; an empty mapping stays a value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dotted_get(tree: dict[str, Any], key: str) -> Any:
    """tree["a"]["b"] for "a.b", or MISSING."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Dotted keys whose value differs between flat configs (a key only some have counts), in
    config order."""
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if len({hashable(c.get(key, MISSING)) for c in configs}) > 1]


def hashable(value: Any) -> Any:
    """A value as a dict key or set member: lists and mappings by their JSON."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
