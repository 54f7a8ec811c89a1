"""The config reference, as Markdown, read from the config classes: `kdl validate --reference`.

Every fact in it comes from the code: the keys, types, defaults and constraints from pydantic's
field info (annotations, FieldInfo.metadata), the words from each field's description and each
class's docstring, the families from the open registries in the order they registered (a family
registered from outside appears too), a task's models, metrics and pairings from its declarations.
docs/config.md is this page; a test fails when the two differ.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, Discriminator, SerializeAsAny, Tag
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from .families import MODELS, REGISTRIES, DataConfig, Family, ModelConfig, Registry, TaskConfig
from .root import Config

COMMAND = "kdl validate --reference > docs/config.md"

# pydantic's constraints on a value (annotated_types), as the reference writes them
BOUNDS = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"),
          annotated_types.Le: ("<=", "le"), annotated_types.Lt: ("<", "lt")}
NOT_CONSTRAINTS = (SerializeAsAny, Discriminator, Tag)  # how values serialize, which union member


def markdown() -> str:
    """The whole reference page, ending with a newline."""
    blocks = [
        "# Config reference",
        f"Generated from the config classes by `{COMMAND}`; do not edit it by hand. A key's "
        "description is its pydantic field's, a section's text its class's docstring "
        "(karpathy_runner/config/): change those and run the command again.",
        _text(_doc(Config)),
        "Each key is written as `--set` takes it (`--set data.batch_size=128`); in a YAML file each "
        "dot is one level of nesting. Keys left out take their defaults; `kdl validate CONFIG` prints "
        "them all.",
        "## Top level",
        _table("", Config),
    ]
    for name, field in Config.model_fields.items():
        if name in REGISTRIES:
            blocks += _families(name, field.description, REGISTRIES[name])
        else:
            blocks += _branches(name, field.annotation, level=2)
    return "\n\n".join(block for block in blocks if block) + "\n"


# ----------------------------------------------------------------------------- sections


def _families(branch: str, description: str | None, registry: Registry[Any]) -> list[str]:
    """The section of a family branch: one subsection per registered family."""
    families = "; ".join(_code_list(cls.names()) for cls in registry.classes())
    blocks = [f"## `{branch}`", _text(description or ""),
              f"`{branch}.name` picks the {registry.base.NOUN} family; the families, in the order they "
              f"registered: {families}."]
    for cls in registry.classes():
        blocks += [f"### `{branch}.name`: {_code_list(cls.names())}", _text(_doc(cls)),
                   _declarations(cls), _table(f"{branch}.", cls)]
        for name, field in cls.model_fields.items():
            blocks += _branches(f"{branch}.{name}", field.annotation, level=4)
    return blocks


def _branches(key: str, annotation: Any, level: int) -> list[str]:
    """The section of a plain branch (a map of name -> branch too), then one per branch inside it;
    the branch's description is its row in the table above."""
    found = _branch_classes(annotation)
    if not found:
        return []
    blocks: list[str] = [f"{'#' * level} `{key}`"]
    tabled: set[type[BaseModel]] = set()
    for cls, per_name in found:
        prefix = f"{key}.NAME." if per_name else f"{key}."
        if cls in tabled:
            what = "a map of names to such branches" if per_name else "one such branch"
            blocks.append(f"The same keys also go in {what}: `{prefix}KEY`.")
            continue
        tabled.add(cls)
        blocks += [_text(_doc(cls)), _table(prefix, cls)]
        for name, field in cls.model_fields.items():
            blocks += _branches(f"{prefix}{name}", field.annotation, level + 1)
    return blocks


def _branch_classes(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The branch classes a field holds: (class, False) for a branch, (class, True) for a map of
    name -> branch, one entry per form, in the annotation's order."""
    annotation = _bare(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    if get_origin(annotation) is dict:
        value = _bare(get_args(annotation)[1])
        return [(value, True)] if isinstance(value, type) and issubclass(value, BaseModel) else []
    if _is_union(annotation):
        return [form for member in get_args(annotation) for form in _branch_classes(member)]
    return []


def _declarations(cls: type[Family]) -> str:
    """What a family declares beside its keys: the kind of data, which tasks train what."""
    lines = []
    if issubclass(cls, DataConfig) and cls.KIND:
        lines.append(f"Kind of data: `{cls.KIND}`.")
    if issubclass(cls, ModelConfig) and cls.TASKS:
        lines.append("Trained by: " + "; ".join(f"task `{task}` on {_code_list(kinds)} data"
                                                for task, kinds in cls.TASKS.items()) + ".")
    if issubclass(cls, TaskConfig):
        lines.append(f"Models (each with its optimizer): {_code_list(cls.MODELS)}.")
        lines.append("Metrics: " + ", ".join(f"`{metric}` ({'lower' if way == 'min' else 'higher'} is "
                                             f"better: {way})" for metric, way in cls.METRICS.items()) + ".")
        default = f"`{cls.DEFAULT_METRIC}`" if cls.DEFAULT_METRIC else "none (`null`)"
        lines.append(f"Default metric (`train.best_metric` when not set): {default}.")
        lines.append("Trains: " + ("; ".join(f"on `{kind}` data {_code_list(models)}"
                                              for kind, models in _trains(cls).items()) or "nothing") + ".")
    return "\n".join(f"- {line}" for line in lines)


def _trains(task: type[TaskConfig]) -> dict[str, list[str]]:
    """Data kind -> the model families the task trains on it: as the task declares them, then
    those models that declare it for themselves (families.trains asks both)."""
    pairs = {kind: list(models) for kind, models in task.TRAINS.items()}
    for model in MODELS.classes():
        for name in task.names():
            for kind in model.TASKS.get(name, ()):
                pairs.setdefault(kind, []).extend(n for n in model.names() if n not in pairs[kind])
    return pairs


# ----------------------------------------------------------------------------- one table


def _table(prefix: str, cls: type[BaseModel]) -> str:
    """One row per key of `cls`, named `prefix` + key."""
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        kind, rules = _type(field.annotation)
        rules = _rules(field.metadata) + rules
        if issubclass(cls, Family) and name == "name":
            default = "(picks the family)"
        elif _branch_classes(field.annotation):
            default = "(below)"
        elif field.is_required():
            default = "required"
        else:
            default = _code(_yaml(field.get_default(call_default_factory=True)))
        cells = [_code(prefix + name), _cell(kind), default, _cell("; ".join(rules)),
                 _cell(field.description or "")]
        # a pipe in a cell is escaped, inside code spans too (as GFM wants)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def _type(annotation: Any) -> tuple[str, list[str]]:
    """(type as the reference writes it, constraints the annotation carries inside it)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        kind, rules = _type(args[0])
        return kind, _rules(args[1:]) + rules
    if origin is Literal:
        kinds = dict.fromkeys(_type_name(type(value)) for value in args)
        return " or ".join(kinds), ["one of " + ", ".join(_code(_yaml(value)) for value in args)]
    if _is_union(annotation):
        typed = [_type(member) for member in args]
        return " or ".join(dict.fromkeys(kind for kind, _ in typed)), [r for _, rules in typed for r in rules]
    if origin is list:
        kind, rules = _type(args[0])
        return f"list of {kind}", [f"each {rule}" for rule in rules]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _type(list[args[0]])
    if origin is tuple:
        typed = [_type(member) for member in args]
        kind = "[" + ", ".join(kind for kind, _ in typed) + "]"
        if all(item == typed[0] for item in typed):
            return kind, [f"each {rule}" for rule in typed[0][1]]
        return kind, [f"item {i} {rule}" for i, (_, rules) in enumerate(typed, 1) for rule in rules]
    if origin is dict:
        key, _ = _type(args[0])
        value, rules = _type(args[1])
        return f"map of {key} -> {value}", [f"each value {rule}" for rule in rules]
    if isinstance(annotation, type) and issubclass(annotation, Family):
        return f"{_noun(annotation)} family branch", []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "branch", []
    return _type_name(annotation), []


def _noun(cls: type[Family]) -> str:
    return next(r.base.NOUN for r in REGISTRIES.values() if issubclass(cls, r.base))


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _rules(metadata: Any) -> list[str]:
    """Constraints as words: the bounds (annotated_types' Ge, Gt, Le, Lt, as pydantic keeps them
    in FieldInfo.metadata), lengths, and any other constraint as its settings."""
    rules = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # a Field(ge=1) inside Annotated
            rules += _rules(item.metadata)
        elif type(item) in BOUNDS:
            sign, attribute = BOUNDS[type(item)]
            rules.append(f"{sign} {_yaml(getattr(item, attribute))}")
        elif isinstance(item, annotated_types.MinLen):
            rules.append(f"at least {item.min_length} long")
        elif isinstance(item, annotated_types.MaxLen):
            rules.append(f"at most {item.max_length} long")
        elif isinstance(item, annotated_types.MultipleOf):
            rules.append(f"a multiple of {_yaml(item.multiple_of)}")
        elif not isinstance(item, NOT_CONSTRAINTS):
            rules.append(", ".join(f"{key}: {_yaml(value)}" for key, value in _settings(item).items()))
    return rules


def _settings(item: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(item):
        return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    return dict(vars(item))


def _bare(annotation: Any) -> Any:
    """The annotation without its Annotated metadata and without a `| None`."""
    if get_origin(annotation) is Annotated:
        return _bare(get_args(annotation)[0])
    if _is_union(annotation):
        members = [m for m in get_args(annotation) if m is not type(None)]
        return _bare(members[0]) if len(members) == 1 else annotation
    return annotation


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


# ----------------------------------------------------------------------------- Markdown


def _yaml(value: Any) -> str:
    """A value as a YAML file (config.yaml) writes it: 64, null, [32, 64], 1.0e-08."""
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _doc(cls: type) -> str:
    """The class's own docstring (not one it inherits)."""
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _code(text: str) -> str:
    return f"`{text}`"


def _code_list(items: Any) -> str:
    return ", ".join(f"`{item}`" for item in items)


# what Markdown would read as an escape, emphasis or an HTML tag (`<` before a letter: <class>)
MARKUP = re.compile(r"([\\*]|<(?=[A-Za-z/!?]))")


def _text(text: str) -> str:
    """Prose as Markdown: its markup characters escaped outside `code spans`."""
    parts = text.split("`")
    return "`".join(part if i % 2 else MARKUP.sub(r"\\\1", part) for i, part in enumerate(parts))


def _cell(text: str) -> str:
    """Prose for a table cell: one line."""
    return _text(" ".join(text.split()))
