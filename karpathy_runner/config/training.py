"""The training branches of a config: optimizer (one, or one per model), scheduler, train (with
early stopping and the trackers' settings)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from .families import Branch

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


def optimizer_form(raw: Any) -> str:
    """`optimizer` is one branch for every model, or a map of model name -> branch."""
    if isinstance(raw, OptimizerConfig):
        return "one"
    if (isinstance(raw, dict) and raw and not set(raw) & set(OptimizerConfig.model_fields)
            and all(isinstance(v, (dict, OptimizerConfig)) for v in raw.values())):
        return "per_model"
    return "one"


Optimizers = Annotated[
    Union[  # noqa: UP007
        Annotated[OptimizerConfig, Tag("one")],
        Annotated[dict[str, OptimizerConfig], Tag("per_model")],
    ],
    Discriminator(optimizer_form),
]
UNION_TAGS = {"one", "per_model"}


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


Mode = Literal["auto", "min", "max"]  # auto: the direction the task declares for the metric


class EarlyStoppingConfig(Branch):
    patience: int | None = Field(None, ge=1)  # epochs without improvement; null disables
    metric: str | None = None  # defaults to train.best_metric
    mode: Mode = "auto"
    min_delta: float = Field(0.0, ge=0.0)

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str | None) -> str | None:
        return metric if metric is None else _metric_shape(metric)


class MlflowConfig(Branch):
    # null: $MLFLOW_TRACKING_URI if set, else a SQLite store beside the runs (<runs dir>/mlflow.db)
    tracking_uri: str | None = None
    experiment: str | None = None  # null: the config's name


class WandbConfig(Branch):
    project: str | None = None  # null: the config's name
    entity: str | None = None  # null: the user's default entity
    # auto: online when logged in (WANDB_API_KEY or `wandb login`), else offline; $WANDB_MODE wins
    mode: Literal["auto", "online", "offline"] = "auto"


Logger = Literal["tensorboard", "mlflow", "wandb"]
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
METRIC_PATTERN = re.compile(r"^(train|val)\.[a-z_]+$")


def _metric_shape(metric: str) -> str:
    if not METRIC_PATTERN.match(metric):
        raise ValueError(f"must look like val.loss or val.accuracy, got {metric!r}")
    return metric


class TrainConfig(Branch):
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = Field(None, gt=0.0)
    # the task's main metric unless set (see Config); null: none, best.pt is the latest epoch's
    best_metric: str | None = "val.loss"
    best_mode: Mode = "auto"
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    log_every_steps: int = Field(50, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    deterministic: bool = False
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    # torch.compile the models in place, so checkpoint keys stay the same; the first step
    # (which compiles) is timed apart: train.log and meta.json's compile_s
    compile: bool = False
    # conv weights and activations in channels-last layout; null: on for conv nets on CUDA,
    # where tensor cores want it, off elsewhere
    channels_last: bool | None = None
    # where the metrics also go: TensorBoard (tb/), MLflow, Weights & Biases; [] for none of them
    loggers: list[Logger] = Field(default_factory=lambda: ["tensorboard"])
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @field_validator("loggers")
    @classmethod
    def _unique(cls, loggers: list[str]) -> list[str]:
        twice = sorted({name for name in loggers if loggers.count(name) > 1})
        if twice:
            raise ValueError(f"names {', '.join(twice)} more than once; list each logger once")
        return loggers

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps; got {device!r}")
        return device

    @field_validator("best_metric")
    @classmethod
    def _metric(cls, metric: str | None) -> str | None:
        return metric if metric is None else _metric_shape(metric)

    @model_validator(mode="after")
    def _stopping_needs_a_metric(self) -> TrainConfig:
        if self.early_stopping.patience is not None and not (self.early_stopping.metric or self.best_metric):
            raise ValueError(
                "train.early_stopping.patience needs a metric to watch: set "
                "train.early_stopping.metric (or train.best_metric)"
            )
        return self


def _family(classes: tuple[type[Branch], ...]) -> Any:
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" allows a "\n"


