"""The training branches of a config: optimizer (one, or one per model), scheduler, train (with
early stopping and the trackers' settings)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from .families import Branch

# ----------------------------------------------------------------------------- optimization


class OptimizerConfig(Branch):
    """A torch optimizer, built from plain values: `name` picks it, and each setting's
    description names the optimizers it applies to."""

    name: Literal["sgd", "adam", "adamw", "rmsprop"] = Field(
        "adam", description="torch.optim's SGD, Adam, AdamW (decoupled weight decay) or RMSprop.")
    lr: float = Field(1e-3, gt=0.0, description="The learning rate; the scheduler's peak, and scaled per "
                      "parameter group where a model or task asks (e.g. model.backbone_lr_scale).")
    weight_decay: float = Field(0.0, ge=0.0, description="sgd, adam, rmsprop: an L2 penalty added to the "
                                "gradient; adamw: the weights shrink by lr times this at each step.")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd, rmsprop: the momentum factor; 0: none.")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0).")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999),
        description="adam, adamw: decay rates of the running means of the gradient and of its square.",
    )
    eps: float = Field(1e-8, gt=0.0, description="adam, adamw, rmsprop: added to the denominator, for "
                       "numerical stability.")
    alpha: float = Field(0.99, gt=0.0, lt=1.0, description="rmsprop: decay rate of the running mean of "
                         "the squared gradient.")

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

    name: Literal["none", "step", "cosine", "onecycle"] = Field(
        "none",
        description="none: a constant lr; step: times gamma every step_size epochs; cosine: a cosine "
        "from lr down to min_lr over the run; onecycle: a cosine up from lr / div_factor to lr, then "
        "down to that start / final_div_factor.",
    )
    warmup_epochs: float = Field(0.0, ge=0.0, description="A linear warm-up to lr over this many epochs "
                                 "(fractions allowed) before the schedule; onecycle has its own rise.")
    step_size: int = Field(30, ge=1, description="step: epochs between decays.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step: the decay factor.")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: the floor the lr ends at.")
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="onecycle: the fraction of the run's steps "
                             "spent rising.")
    div_factor: float = Field(25.0, ge=1.0, description="onecycle: start at lr / div_factor.")
    final_div_factor: float = Field(1e4, ge=1.0, description="onecycle: end at the start lr / "
                                    "final_div_factor.")


Mode = Literal["auto", "min", "max"]  # auto: the direction the task declares for the metric


class EarlyStoppingConfig(Branch):
    """Stop training when a metric has not improved for `patience` epochs."""

    patience: int | None = Field(None, ge=1, description="Epochs without improvement before training "
                                 "stops; null: no early stopping.")
    metric: str | None = Field(None, description="The metric watched (split.name, e.g. val.accuracy); "
                               "null: train.best_metric.")
    mode: Mode = Field("auto", description="min or max: which way the metric improves; auto: the "
                       "direction the task declares for it.")
    min_delta: float = Field(0.0, ge=0.0, description="An improvement must beat the best value so far by "
                             "more than this.")

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str | None) -> str | None:
        return metric if metric is None else _metric_shape(metric)


class MlflowConfig(Branch):
    """Where MLflow records the run, when train.loggers names mlflow."""

    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI if set, else a SQLite "
                                     "store beside the runs (<runs dir>/mlflow.db).")
    experiment: str | None = Field(None, description="The MLflow experiment; null: the config's name.")


class WandbConfig(Branch):
    """Where Weights & Biases records the run, when train.loggers names wandb."""

    project: str | None = Field(None, description="The W&B project; null: the config's name.")
    entity: str | None = Field(None, description="The W&B user or team; null: the user's default entity.")
    mode: Literal["auto", "online", "offline"] = Field(
        "auto",
        description="auto: online when logged in (WANDB_API_KEY or `wandb login`), else offline; "
        "$WANDB_MODE wins.",
    )


Logger = Literal["tensorboard", "mlflow", "wandb"]
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
METRIC_PATTERN = re.compile(r"^(train|val)\.[a-z_]+$")


def _metric_shape(metric: str) -> str:
    if not METRIC_PATTERN.match(metric):
        raise ValueError(f"must look like val.loss or val.accuracy, got {metric!r}")
    return metric


class TrainConfig(Branch):
    """The training loop: its length, device and precision, the best checkpoint, early stopping,
    logging, checkpoints and the trackers the metrics also go to."""

    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps in all, "
                                  "mid-epoch if need be (the partial epoch ends as an epoch does, with "
                                  "its val and checkpoint); null: epochs decides.")
    max_minutes: float | None = Field(None, gt=0.0, description="Stop once the run has trained this "
                                      "many minutes, added up over its resumes (meta.json's "
                                      "duration_s), mid-epoch if need be, as max_steps does: the run "
                                      "completes with a val of its partial epoch and a checkpoint. "
                                      "Set it below a job's time limit.")
    device: str = Field("auto", description="auto (CUDA, else Apple's MPS, else the CPU), cpu, cuda, "
                        "cuda:N or mps.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16, fp16: mixed precision under autocast (fp16 with a gradient scaler).")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip each optimizer's gradients to this "
                                    "total norm before its step; null: no clipping.")
    best_metric: str | None = Field(
        "val.loss",
        description="The metric that picks best.pt (split.name, e.g. val.accuracy); left out: the "
        "task's main metric (its DEFAULT_METRIC); null: none, best.pt is the latest epoch's.",
    )
    best_mode: Mode = Field("auto", description="min or max: which way best_metric improves; auto: the "
                            "direction the task declares for it.")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig,
                                                description="Stop when a metric stops improving.")
    log_every_steps: int = Field(50, ge=1, description="Training metrics are reduced, checked for "
                                 "non-finite losses and logged every this many steps.")
    eval_every_steps: int | None = Field(None, ge=1, description="Also validate every this many "
                                         "steps within an epoch (records of split val marked "
                                         "mid_epoch in metrics.jsonl): a learning curve for long "
                                         "epochs. The best checkpoint and early stopping still judge "
                                         "each epoch's end; null: at each epoch's end only.")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also save last.pt every this "
                                               "many steps within an epoch; null: at each epoch's end "
                                               "only.")
    deterministic: bool = Field(False, description="torch's deterministic algorithms (a warning where "
                                "one has none) and no cuDNN autotuner: repeatable, slower.")
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop",
        description="A non-finite (NaN, inf) loss: stop fails the run at the next log (the checkpoints "
        "keep the last finite weights); skip_step skips that step's updates and goes on (checking "
        "every step, a sync each).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the models in place, so checkpoint keys stay the same; the first "
        "step (which compiles) is timed apart: train.log and meta.json's compile_s.",
    )
    sync_batch_norm: bool = Field(
        False,
        description="With several processes (--nproc-per-node): batch norm normalises over the whole "
        "global batch (torch's SyncBatchNorm), as one process would, not each process's share; its "
        "running statistics are then the global batch's. CUDA GPUs only (refused on the CPU). One "
        "process: no effect.",
    )
    channels_last: bool | None = Field(
        None,
        description="Conv weights and activations in channels-last layout; null: on for conv nets on "
        "CUDA, where tensor cores want it, off elsewhere.",
    )
    loggers: list[Logger] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where the metrics also go: TensorBoard (tb/), MLflow, Weights & Biases; [] for "
        "none of them.",
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="MLflow's settings.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases' settings.")

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


