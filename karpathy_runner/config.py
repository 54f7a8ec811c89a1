"""The typed config tree: defaults for every key, YAML loading, dotted overrides, validation.

Each branch (data, model, task, optimizer, scheduler, train) is its own class and is handed alone
to the component that owns it. Families that differ in their keys (datasets, models, tasks) are
tagged unions on `name`, so a new family is one new class added to its tuple below, plus its
module (the class's MODULE) under data/, models/ or tasks/.

A task class also declares, as plain class values that need no torch: the models it trains (the
keys of a per-model `optimizer` map), its metrics and which way each is better, and which model
families it trains on which kind of data. That declaration picks the default task, checks
`train.best_metric` and `train.early_stopping.metric`, and is stored in meta.json for `kdl runs
--sort` and `kdl compare`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from . import safe_yaml
from .dotted import MISSING, flatten
from .errors import ConfigError

# Part of every config hash: bump it when a key's meaning changes, so that runs made before the
# change no longer count as the same experiment for --skip-existing. Adding a key with a default
# needs no bump: the hash covers only values that differ from the defaults.
SCHEMA_MAJOR = 1

# seeds go to generators that take 64 bits (torch.manual_seed): bounded here, not by a traceback
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class Branch(BaseModel):
    """A config branch: unknown keys are refused, values are never silently coerced from text."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


def family_names(cls: type[Branch]) -> tuple[str, ...]:
    """The `name` values a family class answers to."""
    return get_args(cls.model_fields["name"].annotation)


# ----------------------------------------------------------------------------- data


class ImageDataConfig(Branch):
    """Image classification data (torchvision datasets, scikit-learn digits, a user's folder)."""

    KIND: ClassVar[str] = "image"
    MODULE: ClassVar[str] = "images"
    # what to change for models that other kinds of data suit
    KIND_NOTES: ClassVar[dict[str, str]] = {
        "image": "or set data.as_sequence: rows to feed each image row by row to rnn, lstm or gru",
        "image_rows": "or set data.as_sequence: none to train a cnn on whole images",
    }

    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder"] = (
        "digits"
    )
    root: str = "data"
    download: bool = True
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: Seed = 0
    augment: list[Literal["crop", "flip"]] = Field(default_factory=list)
    crop_padding: int = Field(4, ge=0)
    image_size: int = Field(32, ge=4)
    # device: the decoded images live on the training device, batches are cut and augmented
    # there; stream: batches are gathered on the host (by num_workers DataLoader workers) and
    # copied over; auto: device for datasets held in memory that fit, stream for image_folder
    placement: Literal["auto", "device", "stream"] = "auto"
    num_workers: int = Field(0, ge=0)  # DataLoader workers of the stream placement
    skip_bad_files: bool = False  # image_folder: leave out (and count) files that do not decode
    # rows: each image is a sequence of its rows (H steps of C x W values), for recurrent models
    as_sequence: Literal["none", "rows"] = "none"

    @classmethod
    def kind_of(cls, values: dict[str, Any]) -> str:
        return "image_rows" if values.get("as_sequence") == "rows" else cls.KIND


class TextDataConfig(Branch):
    """Text classification: IMDB reviews (aclImdb) or a user's CSV, TSV or JSONL files, split into
    words; the vocabulary comes from the training split only."""

    KIND: ClassVar[str] = "text"
    MODULE: ClassVar[str] = "text"

    name: Literal["imdb", "text_files"] = "imdb"
    root: str = "data"  # imdb: where aclImdb/ is (or is downloaded to)
    download: bool = True
    train_file: str | None = None  # text_files: .csv, .tsv or .jsonl
    val_file: str | None = None  # else val_fraction of train_file
    test_file: str | None = None
    format: Literal["auto", "csv", "tsv", "jsonl"] = "auto"  # auto: from the file's extension
    text_field: str = "text"
    label_field: str = "label"
    lowercase: bool = True
    max_vocab: int = Field(20000, ge=3)  # words kept, most frequent first (with <pad>, <unk>)
    min_freq: int = Field(1, ge=1)  # rarer words become <unk>
    max_length: int = Field(400, ge=1)  # words kept from the start of each text
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: Seed = 0
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _files(self) -> TextDataConfig:
        if self.name == "text_files" and not self.train_file:
            raise ValueError(
                "data.train_file: data.name text_files needs the training file, e.g. "
                "--set data.train_file=reviews.csv (CSV, TSV or JSONL)"
            )
        return self


class CharDataConfig(Branch):
    """A character corpus for language modelling, split contiguously into train and val and cut
    into windows of seq_len characters."""

    KIND: ClassVar[str] = "chars"
    MODULE: ClassVar[str] = "chars"
    EVAL_BATCH_MIN: ClassVar[int] = 1  # val streams: as many as in training unless set

    name: Literal["python_stdlib", "char_text", "tiny_shakespeare"] = "python_stdlib"
    root: str = "data"  # tiny_shakespeare: where it is (or is downloaded to)
    download: bool = True
    path: str | None = None  # char_text: the text file (UTF-8)
    max_chars: int | None = Field(2_000_000, ge=2)  # the corpus is cut to its first max_chars
    seq_len: int = Field(100, ge=1)  # characters per window (and per backprop through time)
    batch_size: int = Field(64, ge=1)  # windows per batch: parallel streams through the corpus
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # the corpus's last part

    @model_validator(mode="after")
    def _path(self) -> CharDataConfig:
        if self.name == "char_text" and not self.path:
            raise ValueError(
                "data.path: data.name char_text needs a text file, e.g. --set data.path=book.txt"
            )
        return self


DATA_FAMILIES: tuple[type[Branch], ...] = (ImageDataConfig, TextDataConfig, CharDataConfig)

# ----------------------------------------------------------------------------- model


class CNNConfig(Branch):
    """A conv stack: per stage conv(k, same padding) -> [batch norm] -> ReLU -> pool 2."""

    MODULE: ClassVar[str] = "cnn"

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


class RNNConfig(Branch):
    """A recurrent network, the cell chosen by name (torch's nn.RNN, nn.LSTM, nn.GRU): tokens
    through an embedding (image rows go in as they are), then a classification head on the final
    state or the mean over the true length, or a language-model head at every step."""

    MODULE: ClassVar[str] = "rnn"

    name: Literal["lstm", "gru", "rnn"] = "lstm"
    embedding_size: int = Field(128, ge=1)
    hidden_size: int = Field(256, ge=1)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # between layers and before the head
    bidirectional: bool = False  # classification only
    pooling: Literal["last", "mean"] = "last"  # classification: final state or mean over steps
    tie_weights: bool = False  # language model: output layer shares the embedding's weights

    @model_validator(mode="after")
    def _tying(self) -> RNNConfig:
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ValueError(
                f"model.tie_weights: true needs model.embedding_size == model.hidden_size "
                f"(got {self.embedding_size} and {self.hidden_size})"
            )
        return self


class GANModelConfig(Branch):
    """DCGAN: a generator of transposed convolutions from a latent vector up to the data's image
    size, and a discriminator of strided convolutions down to one logit, sized from the data."""

    MODULE: ClassVar[str] = "gan"

    name: Literal["gan"] = "gan"
    latent_size: int = Field(100, ge=1)  # the noise vector z
    width: int = Field(64, ge=1)  # feature maps of the layer next to the image (ngf, ndf)
    batch_norm: bool = True  # in the generator, and in the discriminator unless spectral norm
    spectral_norm: bool = False  # on the discriminator's layers (instead of batch norm there)


class SpeedrunConfig(Branch):
    """A fast CIFAR-10 network after airbench94's published ideas (see models/speedrun.py):
    a stem, conv groups with batch norm and GELU, a global max pool, scaled-down logits."""

    MODULE: ClassVar[str] = "speedrun"

    name: Literal["speedrun"] = "speedrun"
    stem_width: int = Field(24, ge=1)  # the 2x2 stem conv
    widths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 256, 256])
    bn_momentum: float = Field(0.4, gt=0.0, le=1.0)  # torch's convention: weight of the new batch
    logit_scale: float = Field(1 / 9, gt=0.0)
    bias_lr_scale: float = Field(64.0, gt=0.0)  # batch-norm shifts learn this much faster

    @field_validator("widths")
    @classmethod
    def _some_widths(cls, widths: list[int]) -> list[int]:
        if not widths:
            raise ValueError("needs at least one conv group, e.g. [64, 256, 256]")
        return widths


FREEZE_PATTERN = re.compile(r"^(none|backbone|until:[A-Za-z_][A-Za-z0-9_.]*)$")


class TorchvisionConfig(Branch):
    """A torchvision classification model (resnet18, mobilenet_v3_small, efficientnet_b0, ...)
    with its last linear layer (the head) replaced for the data's classes; optionally from
    pretrained weights, with a frozen or slower backbone (transfer learning)."""

    MODULE: ClassVar[str] = "zoo"

    name: Literal["torchvision"] = "torchvision"
    arch: str = "resnet18"  # any name of torchvision.models.list_models(torchvision.models)
    # none: random init; imagenet: torchvision's published weights (downloaded once into the
    # torch cache); else the path of a local state dict of this arch (torch.save(model.state_dict()))
    pretrained: str = "none"
    # none | backbone (all but the head) | until:<layer> (that module and all before it, e.g.
    # until:layer2 for a resnet); frozen batch norm keeps its statistics (eval mode)
    freeze: str = "none"
    backbone_lr_scale: float = Field(1.0, gt=0.0)  # the backbone's lr is optimizer.lr times this

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, freeze: str) -> str:
        if not FREEZE_PATTERN.match(freeze):
            raise ValueError(f"must be none, backbone or until:<layer> (e.g. until:layer2), got {freeze!r}")
        return freeze


MODEL_FAMILIES: tuple[type[Branch], ...] = (CNNConfig, RNNConfig, GANModelConfig, SpeedrunConfig,
                                            TorchvisionConfig)
RECURRENT = ("lstm", "gru", "rnn")

# ----------------------------------------------------------------------------- task


class ClassifyConfig(Branch):
    """Classification: cross-entropy, accuracy; per-class accuracy and a confusion matrix in eval."""

    MODULE: ClassVar[str] = "classify"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "accuracy": "max"}
    DEFAULT_METRIC: ClassVar[str] = "val.loss"
    # data kind -> model families
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {
        "image": ("cnn", "speedrun", "torchvision"), "image_rows": RECURRENT, "text": RECURRENT,
    }

    name: Literal["classify"] = "classify"
    # training targets (1 - s) on the true class and s spread over all classes; eval reports the
    # plain cross-entropy, so val.loss stays comparable across settings
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # evaluation averages the logits of each image and of its mirror image (test-time
    # augmentation); images only
    eval_flip: bool = False


class LanguageModelConfig(Branch):
    """Next-character prediction: loss in nats per character, bits per character, perplexity."""

    MODULE: ClassVar[str] = "language_model"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "bpc": "min", "perplexity": "min"}
    DEFAULT_METRIC: ClassVar[str] = "val.loss"
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {"chars": RECURRENT}

    name: Literal["language_model"] = "language_model"
    # truncated backprop through time: batches walk through the corpus in order, each row a
    # stream, and the hidden state carries from one batch to the next (detached); false:
    # windows in random order, each from a zero state
    carry_hidden: bool = True
    sample_length: int = Field(300, ge=0)  # characters sampled after each epoch (0: none)
    sample_temperature: float = Field(0.8, gt=0.0)


class GANTaskConfig(Branch):
    """Adversarial training in two labelled phases per step: the discriminator, then (every
    d_steps steps) the generator. No metric of training measures sample quality, so there is no
    best checkpoint by default (best.pt follows last.pt); `kdl eval --features RUN` measures it."""

    MODULE: ClassVar[str] = "gan"
    MODELS: ClassVar[tuple[str, ...]] = ("generator", "discriminator")
    # d_real / d_fake: the discriminator's mean belief that real / generated images are real
    METRICS: ClassVar[dict[str, str]] = {"d_loss": "min", "g_loss": "min", "d_real": "max",
                                         "d_fake": "min"}
    DEFAULT_METRIC: ClassVar[str | None] = None
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {"image": ("gan",)}

    name: Literal["gan"] = "gan"
    loss: Literal["bce", "hinge"] = "bce"  # bce: the non-saturating loss of the DCGAN paper
    d_steps: int = Field(1, ge=1)  # discriminator updates per generator update
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # bce: real images labelled 1 - s
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)  # null: samples from the raw generator
    grid_size: int = Field(64, ge=1)  # images in each epoch's sample grid (fixed noise)


TASK_FAMILIES: tuple[type[Branch], ...] = (ClassifyConfig, LanguageModelConfig, GANTaskConfig)

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


def _optimizer_form(raw: Any) -> str:
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
    Discriminator(_optimizer_form),
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


class Config(Branch):
    name: str = "run"
    seed: Seed = 0
    data: _family(DATA_FAMILIES) = Field(default_factory=DATA_FAMILIES[0])
    model: _family(MODEL_FAMILIES) = Field(default_factory=MODEL_FAMILIES[0])
    task: _family(TASK_FAMILIES) = Field(default_factory=TASK_FAMILIES[0])
    optimizer: Optimizers = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, raw: Any) -> Any:
        return with_derived_defaults(raw)

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
        tree["data"]["name"] = family_names(DATA_FAMILIES[0])[0]
        tree["model"]["name"] = family_names(MODEL_FAMILIES[0])[0]
        chosen = default_task(self.model.name, data_kind(self.data))
        tree["task"]["name"] = family_names(chosen)[0] if chosen else None
        tree["train"]["best_metric"] = type(self.task).DEFAULT_METRIC
        return tree


# ----------------------------------------------------------------------------- tasks and data


def with_derived_defaults(raw: Any) -> Any:
    """A raw config with the defaults that depend on other keys filled in: a branch without a
    name gets its family's default, the task the one that trains this model on this data, the
    best metric that task's main metric. Filled in before validation so that the resolved config
    (config.yaml) says which were used."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for branch, families in (("data", DATA_FAMILIES), ("model", MODEL_FAMILIES)):
        node = raw.get(branch)
        if isinstance(node, dict) and "name" not in node:
            raw[branch] = {"name": family_names(families[0])[0], **node}
    task = raw.get("task")
    if task is None or isinstance(task, dict) and "name" not in task:
        chosen = default_task(_raw_name(raw, "model", MODEL_FAMILIES), data_kind(raw.get("data")))
        if chosen is not None:
            raw["task"] = {**(task or {}), "name": family_names(chosen)[0]}
    train = raw.get("train")
    if train is None or isinstance(train, dict) and "best_metric" not in train:
        spec = task_class(_raw_name(raw, "task", TASK_FAMILIES))
        if spec is not None:
            raw["train"] = {**(train or {}), "best_metric": spec.DEFAULT_METRIC}
    return raw


def _raw_name(raw: dict[str, Any], branch: str, families: tuple[type[Branch], ...]) -> Any:
    node = raw.get(branch)
    if node is None:
        return family_names(families[0])[0]
    return node.get("name", family_names(families[0])[0]) if isinstance(node, dict) else None


KIND_WORDS = {"image_rows": "image rows", "chars": "character"}  # data kinds in messages


def data_kind(data: Any) -> str | None:
    """What a `data` branch (raw or validated) holds: image, image_rows, text, chars."""
    values = data.model_dump() if isinstance(data, BaseModel) else data if isinstance(data, dict) else {}
    if data is not None and not isinstance(data, (dict, BaseModel)):
        return None
    name = values.get("name", family_names(DATA_FAMILIES[0])[0])
    cls = next((c for c in DATA_FAMILIES if name in family_names(c)), None)
    if cls is None:
        return None
    return cls.kind_of(values) if hasattr(cls, "kind_of") else cls.KIND


def task_class(name: Any) -> Any:
    return next((cls for cls in TASK_FAMILIES if name in family_names(cls)), None)


def default_task(model: Any, kind: str | None, tasks: tuple[Any, ...] = TASK_FAMILIES) -> Any:
    """The first task that trains `model` on data of `kind`, or None."""
    return next((cls for cls in tasks if model in cls.TRAINS.get(kind, ())), None)


def task_problems(task: Any, model: str, data: str, kind: str,
                  tasks: tuple[Any, ...] = TASK_FAMILIES, note: str = "") -> list[str]:
    """Why a task cannot train this model on this data (empty when it can); `note` is the data
    family's hint for this kind (another setting that would suit other models)."""
    if model in task.TRAINS.get(kind, ()):
        return []
    task_name, what = family_names(task)[0], KIND_WORDS.get(kind, kind)
    suitable = default_task(model, kind, tasks)
    if suitable is not None:
        return [f"task.name: the {task_name} task cannot train model.name {model!r} on "
                f"data.name {data!r} ({what} data); for that pair use task.name: "
                f"{family_names(suitable)[0]} (the default when task is not set)"]
    models = [m for cls in tasks for m in cls.TRAINS.get(kind, ())]
    fix = (f"on {what} data use model.name: {' or '.join(dict.fromkeys(models))}" if models
           else "choose another dataset")
    fix += f", {note}" if note else ""
    return [f"model.name: no task trains model.name {model!r} on data.name {data!r} ({what} "
            f"data); {fix}"]


def _cross_problems(cfg: Config) -> list[str]:
    """Problems between branches: the task against the model and data, the metrics against the
    task's declared ones, the optimizer map against the task's models."""
    task, kind = type(cfg.task), data_kind(cfg.data)
    notes = getattr(type(cfg.data), "KIND_NOTES", {})
    problems = task_problems(task, cfg.model.name, cfg.data.name, kind, note=notes.get(kind, ""))
    if cfg.model.name in RECURRENT:
        if cfg.model.bidirectional and cfg.task.name == "language_model":
            problems.append("model.bidirectional: a language model predicts each next character "
                            "from the ones before it only; set model.bidirectional: false")
        if cfg.model.tie_weights and cfg.task.name != "language_model":
            problems.append("model.tie_weights: only a language model has an output layer the size "
                            "of its vocabulary to tie; set model.tie_weights: false")
    if getattr(cfg.task, "eval_flip", False) and kind != "image":
        problems.append(f"task.eval_flip: mirroring applies to whole images; data.name "
                        f"{cfg.data.name!r} gives {KIND_WORDS.get(kind, kind)} data. Set "
                        "task.eval_flip: false")
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


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with safe loading; anything but a mapping is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [f"config file {str(path)!r} does not exist; pass a YAML file such as configs/digits_cnn.yaml"]
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
    raw = with_derived_defaults(raw)  # first: which task (and so which keys) this config means
    problems = _unknown_keys(raw, Config, "")
    if problems:
        raise ConfigError(problems, source)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()], source) from None
    problems = _cross_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    raw = apply_overrides(load_yaml(path), overrides or [])
    return resolve(raw, str(path))


# ----------------------------------------------------------------------------- error messages

# how a value problem ends: where to fix it; `kdl sweep` cuts it off to point at --grid instead
FIX_HINT = ". Fix it in the config or with --set"


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
            if wanted in family_names(member):
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
        if cls is Config and key == "optimizer":  # one branch, or one per model
            branches = value.items() if _optimizer_form(value) == "per_model" else [(None, value)]
            for model, branch in branches:
                where = f"{path}.{model}." if model else f"{path}."
                problems += _unknown_keys(branch, OptimizerConfig, where)
            continue
        sub = _branch_class(fields[key].annotation, value)
        if sub is not None:
            problems += _unknown_keys(value, sub, f"{path}.")
    return problems


_NAMES = {"data": "dataset", "model": "model", "task": "task", "optimizer": "optimizer",
          "scheduler": "scheduler"}
_FAMILIES = {"data": DATA_FAMILIES, "model": MODEL_FAMILIES, "task": TASK_FAMILIES}


def _describe(err: dict[str, Any]) -> str:
    """One line per pydantic error: key path, what is wrong, the value given, the fix."""
    loc = [str(part) for part in err["loc"]]
    # tagged unions put the member's tag in the path: data.cifar10.batch_size -> data.batch_size
    if len(loc) > 1 and (loc[1] in _all_family_names(loc[0]) or loc[0] == "optimizer"
                         and loc[1] in UNION_TAGS):
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
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{path}: expected a mapping of keys, got {value!r}"
    msg = err["msg"]
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    if msg.startswith("Value error, "):  # our validators already show the value
        msg, shown = msg[len("Value error, "):], ""
        if msg.startswith(path):  # ... and sometimes the key
            return f"{msg}{FIX_HINT}"
    else:
        msg = msg.replace("Input should be", "must be").replace("input should be", "must be")
    return f"{path}: {msg}{shown}{FIX_HINT} {path}=VALUE"


def _all_family_names(branch: str) -> set[str]:
    return {n for cls in _FAMILIES.get(branch, ()) for n in family_names(cls)}


def _choices(loc: list[str]) -> list[str]:
    if not loc:
        return []
    if loc[0] in _FAMILIES:
        return sorted(_all_family_names(loc[0]))
    cls = {"optimizer": OptimizerConfig, "scheduler": SchedulerConfig}.get(loc[0])
    return list(family_names(cls)) if cls else []
