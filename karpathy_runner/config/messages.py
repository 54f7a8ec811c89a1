"""Pydantic's errors as kdl's: one line per problem, naming the key path, what is wrong, the
value given and the fix; unknown keys with the closest valid one."""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel

from ..errors import quoted
from .families import REGISTRIES
from .root import Config
from .training import UNION_TAGS, OptimizerConfig, SchedulerConfig, optimizer_form

# how a value problem ends: where to fix it; `kdl sweep` cuts it off to point at --grid instead
FIX_HINT = ". Fix it in the config or with --set"


def unknown_keys(raw: Any, cls: type[BaseModel], prefix: str) -> list[str]:
    """Each key of `raw` that `cls` (a family's class chosen by the raw `name`) does not have,
    with the closest valid one."""
    if not isinstance(raw, dict):
        return []
    problems = []
    fields = cls.model_fields
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(fields)
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            problems.append(f"{path}: unknown key.{hint} Valid keys at {where}: {valid}")
            continue
        if issubclass(cls, Config) and key == "optimizer":  # one branch, or one per model
            branches = value.items() if optimizer_form(value) == "per_model" else [(None, value)]
            for model, branch in branches:
                where = f"{path}.{model}." if model else f"{path}."
                problems += unknown_keys(branch, OptimizerConfig, where)
            continue
        sub = _branch_class(cls, key, value)
        if sub is not None:
            problems += unknown_keys(value, sub, f"{path}.")
    return problems


def _branch_class(cls: type[BaseModel], key: str, raw: Any) -> type[BaseModel] | None:
    """The class of branch `key`: a family's by the raw `name`, else the field's own."""
    if issubclass(cls, Config) and key in REGISTRIES:
        registry = REGISTRIES[key]
        return registry.get(raw.get("name", registry.default_name()) if isinstance(raw, dict) else None)
    annotation = cls.model_fields[key].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


_NAMES = {"optimizer": OptimizerConfig, "scheduler": SchedulerConfig}  # their names are Literals


def describe(err: dict[str, Any]) -> str:
    """One line per pydantic error: key path, what is wrong, the value given, the fix."""
    loc = [str(part) for part in err["loc"]]
    # the optimizer's union puts its form in the path: optimizer.one.lr -> optimizer.lr
    if len(loc) > 1 and loc[0] == "optimizer" and loc[1] in UNION_TAGS:
        loc.pop(1)
    path = ".".join(loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind == "family_unknown":  # a data, model or task name no family answers to
        return err["msg"]
    if kind == "literal_error" and loc and loc[-1] == "name" and loc[0] in _NAMES:
        choices = get_args(_NAMES[loc[0]].model_fields["name"].annotation)
        return f"{path}: unknown {loc[0]} {quoted(value)}. Valid names: {', '.join(choices)}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{path}: {quoted(value)} is not allowed; choose one of {expected}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{path}: expected a mapping of keys, got {quoted(value)}"
    msg = err["msg"]
    shown = "" if isinstance(value, dict) else f" (got {quoted(value)})"
    if msg.startswith("Value error, "):  # our validators already show the value
        msg, shown = msg[len("Value error, "):], ""
        if msg.startswith(path):  # ... and sometimes the key
            return f"{msg}{FIX_HINT}"
    else:
        msg = msg.replace("Input should be", "must be").replace("input should be", "must be")
    return f"{path}: {msg}{shown}{FIX_HINT} {path}=VALUE"
