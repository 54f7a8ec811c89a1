"""The whole config: the top-level keys, one branch per family registry (data, model, task), the
training branches, and the rules between branches.

Each branch is handed alone to the component that owns it. The families' branches take any
registered family: a branch's `name` picks its config class from the registry (families.py)
when it is validated. A family that leaves its name out gets the registry's first, and the task
the first that trains this model on this data; these derived defaults are filled in before
validation, so the resolved config (config.yaml) says which were used.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from typing import Any

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..dotted import MISSING, flatten
from . import data as _data  # noqa: F401  (registers the built-in families, in this order)
from . import models as _models  # noqa: F401
from . import tasks as _tasks  # noqa: F401
from .families import (
    DATA,
    MODELS,
    REGISTRIES,
    TASKS,
    Branch,
    DataConfig,
    ModelConfig,
    Seed,
    TaskConfig,
    data_kind,
    default_task,
    load_plugins,
    task_problems,
)
from .training import OptimizerConfig, Optimizers, SchedulerConfig, TrainConfig

# Part of every config hash: bump it when a key's meaning changes, so that runs made before the
# change no longer count as the same experiment for --skip-existing. Adding a key with a default
# needs no bump: the hash covers only values that differ from the defaults.
SCHEMA_MAJOR = 1

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" allows a "\n"


load_plugins()  # after kdl's own families: those stay the defaults


def _default(branch: str) -> Any:
    return lambda: REGISTRIES[branch].classes()[0]()


class Config(Branch):
    """The whole config: the run's name and seed, one branch per family registry (data, model,
    task), and the training branches (optimizer, scheduler, train)."""

    name: str = Field("run", description="The run's name, in its run id and folder name, and the "
                      "trackers' default experiment or project: letters, digits, '_', '.', '-' (at "
                      "most 64).")
    seed: Seed = Field(0, description="The run's seed: initial weights, batch order, augmentation "
                       "and dropout (the validation split has its own, data.split_seed).")
    data: SerializeAsAny[DataConfig] = Field(
        default_factory=_default("data"),
        description="The dataset and its batches: the branch of the data family that data.name names "
        "(left out: the first registered).",
    )
    model: SerializeAsAny[ModelConfig] = Field(
        default_factory=_default("model"),
        description="The network: the branch of the model family that model.name names (left out: the "
        "first registered).",
    )
    task: SerializeAsAny[TaskConfig] = Field(
        default_factory=_default("task"),
        description="What is trained and measured: the branch of the task family that task.name names "
        "(left out: the first registered task that trains model.name on the data's kind).",
    )
    optimizer: Optimizers = Field(
        default_factory=OptimizerConfig,
        description="One optimizer branch for every model the task trains, or a map of each of the "
        "task's models (its MODELS) -> its branch.",
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig,
                                       description="The learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, raw: Any) -> Any:
        return with_derived_defaults(raw)

    @field_validator("data", "model", "task", mode="before")
    @classmethod
    def _family(cls, value: Any, info: Any) -> Any:
        """A mapping validated by the config class of the family its `name` names."""
        if not isinstance(value, dict):
            return value  # a config class already, or not a mapping (said by pydantic)
        registry = REGISTRIES[info.field_name]
        family = registry.get(value.get("name", registry.default_name()))
        if family is None:
            raise PydanticCustomError("family_unknown", registry.unknown(value.get("name")))
        return family.model_validate(value)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"must be letters, digits, '_', '.', '-' (at most 64, no '/'), got {name!r}"
            )
        return name

    def optimizer_for(self, model: str) -> OptimizerConfig:
        """The optimizer branch of one of the task's models."""
        return self.optimizer[model] if isinstance(self.optimizer, dict) else self.optimizer

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def hash(self) -> str:
        """Identity of the experiment: the values that differ from the defaults, canonicalised,
        with the schema's major version. A key added later with a default therefore leaves the
        hash of every earlier run as it was."""
        defaults = flatten(self._defaults())
        changed = {key: value for key, value in flatten(self.to_dict()).items()
                   if defaults.get(key, MISSING) != value}
        text = json.dumps({"schema": SCHEMA_MAJOR, "values": changed}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _defaults(self) -> dict[str, Any]:
        """What each key would be if left out: a branch's keys default within its family (built
        without validation: a family may need a key, like char_text's path), the family names to
        the top-level defaults, the task to the one this model and data get, the best metric to
        that task's."""
        tree: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                tree[name] = type(value).model_construct().model_dump(mode="json")
            elif isinstance(value, dict):  # an optimizer per model
                tree[name] = {k: type(v).model_construct().model_dump(mode="json") for k, v in value.items()}
            else:
                tree[name] = field.get_default(call_default_factory=True)
        tree["data"]["name"] = DATA.default_name()
        tree["model"]["name"] = MODELS.default_name()
        chosen = default_task(self.model.name, self.data.kind())
        tree["task"]["name"] = chosen.names()[0] if chosen else None
        tree["train"]["best_metric"] = type(self.task).DEFAULT_METRIC
        return tree


def with_derived_defaults(raw: Any) -> Any:
    """A raw config with the defaults that depend on other keys filled in: a branch without a
    name gets its family's default, the task the one that trains this model on this data, the
    best metric that task's main metric."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for branch in ("data", "model"):
        node = raw.get(branch)
        if isinstance(node, dict) and "name" not in node:
            raw[branch] = {"name": REGISTRIES[branch].default_name(), **node}
    task = raw.get("task")
    if task is None or isinstance(task, dict) and "name" not in task:
        chosen = default_task(_raw_name(raw, "model"), data_kind(raw.get("data")))
        if chosen is not None:
            raw["task"] = {**(task or {}), "name": chosen.names()[0]}
    train = raw.get("train")
    if train is None or isinstance(train, dict) and "best_metric" not in train:
        spec = TASKS.get(_raw_name(raw, "task"))
        if spec is not None:
            raw["train"] = {**(train or {}), "best_metric": spec.DEFAULT_METRIC}
    return raw


def _raw_name(raw: dict[str, Any], branch: str) -> Any:
    node, default = raw.get(branch), REGISTRIES[branch].default_name()
    if node is None:
        return default
    return node.get("name", default) if isinstance(node, dict) else None


def cross_problems(cfg: Config) -> list[str]:
    """Problems between branches: the task against the model and data, each family's own rules
    about the others, the metrics against the task's declared ones, the optimizer map against
    the task's models."""
    task, kind = type(cfg.task), cfg.data.kind()
    note = type(cfg.data).KIND_NOTES.get(kind, "")
    problems = task_problems(task, cfg.model.name, cfg.data.name, kind, note=note)
    problems += cfg.model.problems(cfg.data)
    problems += cfg.task.problems(cfg.model, cfg.data)
    for key, metric in (("train.best_metric", cfg.train.best_metric),
                        ("train.early_stopping.metric", cfg.train.early_stopping.metric)):
        if metric is not None and metric.split(".", 1)[1] not in task.METRICS:
            choices = ", ".join(f"{split}.{m}" for split in ("val", "train") for m in task.METRICS)
            problems.append(f"{key}: {metric!r} is not a metric of the {cfg.task.name} task; "
                            f"choose one of {choices}")
    if isinstance(cfg.optimizer, dict) and set(cfg.optimizer) != set(task.MODELS):
        wrong = [name for name in cfg.optimizer if name not in task.MODELS]
        close = {name: difflib.get_close_matches(name, task.MODELS, n=1) for name in wrong}
        hints = "".join(f" Did you mean 'optimizer.{close[n][0]}' for 'optimizer.{n}'?"
                        for n in wrong if close[n])
        problems.append(
            f"optimizer: a per-model map needs exactly the {cfg.task.name} task's models "
            f"({', '.join(task.MODELS)}), got {', '.join(cfg.optimizer) or 'none'}.{hints} Or give "
            "one branch for every model, e.g. optimizer: {name: adam, lr: 0.001}"
        )
    return problems


def metric_direction(cfg: Config, metric: str, configured: str) -> str:
    """min or max for `metric` (split.name): as configured, or (auto) as the task declares it."""
    return configured if configured != "auto" else type(cfg.task).METRICS[metric.split(".", 1)[1]]
