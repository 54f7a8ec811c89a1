"""The typed config tree: defaults for every key, YAML loading, dotted overrides, validation.

Each branch (data, model, optimizer, scheduler, train) is its own class and is handed alone to
the component that owns it. Families that differ in their keys (models, datasets) are tagged
unions on `name`, so a new family is one new class added to its tuple below.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Branch(BaseModel):
    """A config branch: unknown keys are refused, values are never silently coerced from text."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


# ----------------------------------------------------------------------------- data

IMAGE_DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder")


class ImageDataConfig(Branch):
    """Image classification data (torchvision datasets, scikit-learn digits, a user's folder)."""

    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder"] = (
        "digits"
    )
    root: str = "data"
    download: bool = True
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    augment: list[Literal["crop", "flip"]] = Field(default_factory=list)
    crop_padding: int = Field(4, ge=0)
    image_size: int = Field(32, ge=4)
    num_workers: int = Field(0, ge=0)


DATA_FAMILIES: tuple[type[Branch], ...] = (ImageDataConfig,)

# ----------------------------------------------------------------------------- model


class CNNConfig(Branch):
    """A conv stack: per stage conv(k, same padding) -> [batch norm] -> ReLU -> pool 2."""

    name: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32, 64])
    kernel_size: int = Field(3, ge=1)
    batch_norm: bool = False
    pool: Literal["max", "avg", "none"] = "max"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"must be odd so that 'same' padding keeps the image size, got {k}")
        return k

    @field_validator("channels")
    @classmethod
    def _some_channels(cls, channels: list[int]) -> list[int]:
        if not channels:
            raise ValueError("needs at least one conv stage, e.g. [32, 64]")
        return channels


MODEL_FAMILIES: tuple[type[Branch], ...] = (CNNConfig,)

# ----------------------------------------------------------------------------- optimization


class OptimizerConfig(Branch):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (
        0.9,
        0.999,
    )
    eps: float = Field(1e-8, gt=0.0)
    alpha: float = Field(0.99, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError(
                "optimizer.nesterov: true needs optimizer.name: sgd and optimizer.momentum > 0"
            )
        return self


class SchedulerConfig(Branch):
    """Learning-rate schedule, applied per optimizer step, after an optional linear warm-up."""

    name: Literal["none", "step", "cosine", "onecycle"] = "none"
    warmup_epochs: float = Field(0.0, ge=0.0)
    step_size: int = Field(30, ge=1)  # step: epochs between decays
    gamma: float = Field(0.1, gt=0.0, le=1.0)  # step: decay factor
    min_lr: float = Field(0.0, ge=0.0)  # cosine: floor
    pct_start: float = Field(0.3, gt=0.0, lt=1.0)  # onecycle: rising fraction
    div_factor: float = Field(25.0, ge=1.0)  # onecycle: start at lr / div_factor
    final_div_factor: float = Field(1e4, ge=1.0)  # onecycle: end at start / final_div_factor


class EarlyStoppingConfig(Branch):
    patience: int | None = Field(None, ge=1)  # epochs without improvement; null disables
    metric: str | None = None  # defaults to train.best_metric
    min_delta: float = Field(0.0, ge=0.0)


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
METRIC_PATTERN = re.compile(r"^(train|val)\.[a-z_]+$")


class TrainConfig(Branch):
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = Field(None, gt=0.0)
    best_metric: str = "val.loss"
    best_mode: Literal["auto", "min", "max"] = "auto"
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    log_every_steps: int = Field(50, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    deterministic: bool = False
    on_nonfinite: Literal["stop", "skip_step"] = "stop"

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not DEVICE_PATTERN.match(device):
            raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps; got {device!r}")
        return device

    @field_validator("best_metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if not METRIC_PATTERN.match(metric):
            raise ValueError(f"must look like val.loss or val.accuracy, got {metric!r}")
        return metric


def _family(classes: tuple[type[Branch], ...]) -> Any:
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Config(Branch):
    name: str = "run"
    seed: int = 0
    data: _family(DATA_FAMILIES) = Field(default_factory=DATA_FAMILIES[0])
    model: _family(MODEL_FAMILIES) = Field(default_factory=MODEL_FAMILIES[0])
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"must be letters, digits, '_', '.', '-' (at most 64, no '/'), got {name!r}"
            )
        return name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def hash(self) -> str:
        """Identity of the experiment: the resolved config, canonicalised."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with safe loading; anything but a mapping is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [f"config file {str(path)!r} does not exist; pass a YAML file such as configs/digits_cnn.yaml"]
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            [f"{path} is not valid YAML{where}: {problem}. Fix the file; python tags are refused"]
        ) from None
    if raw is None:
        raise ConfigError([f"{path} is empty; start from configs/digits_cnn.yaml"])
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{path} holds a {type(raw).__name__}, not a mapping of keys (name, data, model, ...)"]
        )
    return raw


SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optimizer.lr=0.1` -> (['optimizer', 'lr'], 0.1); the value is read as a YAML scalar/list."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [f"--set {text!r} is malformed; write --set key.sub=value, e.g. --set optimizer.lr=0.1"]
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(
            [f"--set {text!r}: the value {value!r} is not a valid YAML scalar or list; quote it "
             "for the shell and close its brackets, e.g. --set 'model.channels=[16, 32]'"]
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
    problems = _unknown_keys(raw, Config, "")
    if problems:
        raise ConfigError(problems, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()], source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    raw = apply_overrides(load_yaml(path), overrides or [])
    return resolve(raw, str(path))


# ----------------------------------------------------------------------------- error messages


def _branch_class(annotation: Any, raw: Any) -> type[BaseModel] | None:
    """The Branch class a field holds, choosing a family member by the raw `name` if needed."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Annotated:
        return _branch_class(get_args(annotation)[0], raw)
    if get_origin(annotation) is Union:
        members = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        wanted = raw.get("name") if isinstance(raw, dict) else None
        for member in members:
            if wanted in get_args(member.model_fields["name"].annotation):
                return member
        return members[0] if members and wanted is None else None
    return None


def _unknown_keys(raw: Any, cls: type[BaseModel], prefix: str) -> list[str]:
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
        sub = _branch_class(fields[key].annotation, value)
        if sub is not None:
            problems += _unknown_keys(value, sub, f"{path}.")
    return problems


_NAMES = {"data": "dataset", "model": "model", "optimizer": "optimizer", "scheduler": "scheduler"}


def _describe(err: dict[str, Any]) -> str:
    """One line per pydantic error: key path, what is wrong, the value given, the fix."""
    loc = [str(part) for part in err["loc"]]
    # tagged unions put the member's tag in the path: data.cifar10.batch_size -> data.batch_size
    if len(loc) > 1 and loc[0] in ("data", "model") and loc[1] in _all_family_names(loc[0]):
        loc.pop(1)
    path = ".".join(loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind in ("union_tag_invalid", "literal_error") and loc and loc[-1] == "name" or (
        kind == "union_tag_invalid"
    ):
        family = _NAMES.get(loc[0], loc[0]) if loc else "value"
        choices = _choices(loc)
        given = value.get("name") if isinstance(value, dict) else value
        return (
            f"{path if path.endswith('name') else path + '.name'}: unknown {family} {given!r}. "
            f"Valid names: {', '.join(choices)}"
        )
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{path}: {value!r} is not allowed; choose one of {expected}"
    if kind == "model_type" or kind == "dict_type":
        return f"{path}: expected a mapping of keys, got {value!r}"
    msg = err["msg"]
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    if msg.startswith("Value error, "):  # our validators already show the value
        msg, shown = msg[len("Value error, "):], ""
        if msg.startswith(path):  # ... and sometimes the key
            return f"{msg}. Fix it in the config or with --set"
    else:
        msg = msg.replace("Input should be", "must be").replace("input should be", "must be")
    return f"{path}: {msg}{shown}. Fix it in the config or with --set {path}=VALUE"


def _all_family_names(branch: str) -> set[str]:
    families = DATA_FAMILIES if branch == "data" else MODEL_FAMILIES
    return {n for cls in families for n in get_args(cls.model_fields["name"].annotation)}


def _choices(loc: list[str]) -> list[str]:
    if not loc:
        return []
    if loc[0] in ("data", "model"):
        return sorted(_all_family_names(loc[0]))
    cls = {"optimizer": OptimizerConfig, "scheduler": SchedulerConfig}.get(loc[0])
    return list(get_args(cls.model_fields["name"].annotation)) if cls else []


def default_metric_mode(metric: str, mode: str) -> str:
    """`auto` means min for losses and perplexities, max for everything else."""
    from .runs import metric_mode

    return metric_mode(metric) if mode == "auto" else mode
