"""Nested mappings as the dotted names used everywhere (`--set optimizer.lr=0.1`, compare columns,
sweep grids, metrics filters). Pure Python: imported by commands that must start fast."""

from __future__ import annotations

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
