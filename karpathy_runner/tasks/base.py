"""The base of every task family: `Task`, with every hook the loop and the commands call and its
default; what tasks draw (`Sample`) when asked (`SampleRequest`); what they say of new inputs
(`Prediction`) when asked (`PredictRequest`); what `kdl export` writes (`Export`); an
evaluation pass over a split (`evaluate`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..config.families import ModelConfig, TaskConfig
from ..data import Batches, DataInfo, Prepare
from ..errors import KdlError
from ..models import Model
from .steps import StepResult, Totals


@dataclass
class Sample:
    """What a task draws: a batch of images (uint8 (N, C, H, W)) or text; and optionally more
    of them by name, each kept beside it (a VAE's reconstructions beside its samples:
    samples/epoch-003.png and samples/epoch-003-reconstructions.png)."""

    images: torch.Tensor | None = None
    text: str | None = None
    more: dict[str, Sample] = field(default_factory=dict)


@dataclass
class SampleRequest:
    """What `kdl sample` asks for; each task uses the fields that apply to it (None: its own
    default). Images: `n`; text: `length`, `temperature`, `top_k`, `prime`. Always `seed`."""

    seed: int = 0
    n: int = 64
    length: int = 500
    temperature: float | None = None
    top_k: int | None = None
    prime: str | None = None
    given: frozenset[str] = frozenset()  # the fields the user set (not left at their defaults)
    # text: called with each piece as it is drawn (kdl sample prints it at once)
    stream: Callable[[str], None] | None = None
    more: bool = True  # also what the task draws besides (Sample.more); kdl eval needs none


# the `kdl sample` option of each SampleRequest field
SAMPLE_FLAGS = {"n": "-n", "length": "--length", "temperature": "--temperature", "top_k": "--top-k",
                "prime": "--prime"}


@dataclass
class Export:
    """What `kdl export` writes of a task: `module` (in eval mode) takes the raw `inputs` (as a
    user has them: uint8 images, token ids, noise), its preparation included, and gives the
    outputs; `reference(*inputs)` is what the eager path of the run gives on such inputs (the
    data's own preparation, then the model), which the written file is checked against.
    Dimension 0 of every input and output is the batch, of any size; the others are the
    example's. `metadata` is written into the file (what the inputs and outputs are, the class
    names, the vocabulary, the image size...). A `module` that is already TorchScript (scripted,
    where tracing cannot follow its data-dependent code) is written as it is."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    reference: Callable[..., torch.Tensor]
    metadata: dict[str, Any]
    examples: str  # what the inputs are, for the check's report: "val images", "noise vectors"
    formats: tuple[str, ...] = ("torchscript", "exported-program", "onnx")  # what can take it
    why_only: str = ""  # when not every format: why the others cannot


@dataclass
class PredictRequest:
    """What `kdl predict` asks for; each task uses the fields that apply to it (its
    `predict_options`)."""

    top_k: int = 1  # classes: how many of the likeliest to show
    given: frozenset[str] = frozenset()  # the options the user set (PREDICT_FLAGS' keys)
    # writes a file of a prediction (a mask, a drawing) by name into the folder kdl predict
    # writes to (--out) and returns its path; a name used twice gets a number
    write: Callable[[str, bytes], Path] | None = None


# the `kdl predict` option of each PredictRequest field ("out": where `write` writes)
PREDICT_FLAGS = {"top_k": "--top-k", "out": "--out"}


@dataclass
class Prediction:
    """What `kdl predict` shows for one input: `fields` follow it on its line (tab-separated),
    `record` joins it in its JSON object."""

    input: str  # a file path or a text
    fields: list[str]
    record: dict[str, Any]


class Updater(Protocol):
    """What the trainer offers a task's step (see trainer.Updater)."""

    skipped: bool  # the step met a non-finite loss and is being skipped

    def autocast(self) -> Any: ...

    def step(self, optimizer: str, loss: torch.Tensor) -> None: ...


class Task:
    """Base class: subclasses set `models` and implement the steps; every other hook is declared
    here with its default. A family's task class is made as `Task(cfg, model_cfg, info, device)`
    from its own branch, the model branch, the data's DataInfo and the training device."""

    models: dict[str, nn.Module]
    ordered_batches: bool = False  # the training batches in the data's own order, not shuffled
    draws_images: bool = False  # `kdl eval` scores its samples against the split's images
    can_sample: bool = False  # `kdl sample` draws from it (its `sample`)
    sample_options: tuple[str, ...] = ()  # the SampleRequest fields its `sample` reads, but seed
    # draws_images: without a classifier at hand to score the samples, `kdl eval` reports the
    # task's own metrics alone (a VAE's bound) rather than refusing (a GAN's mean nothing alone)
    scores_optional: bool = False
    predict_options: tuple[str, ...] = ("top_k",)  # the PREDICT_FLAGS its `predict` uses

    def __init__(self, cfg: TaskConfig, model_cfg: ModelConfig, info: DataInfo, device: torch.device):
        self.cfg = cfg
        self.name: str = cfg.name
        self.trainable: tuple[str, ...] = type(cfg).MODELS
        # metric -> "min" | "max": which way is better (stored in meta.json)
        self.metrics: dict[str, str] = dict(type(cfg).METRICS)
        self.device = device
        self.class_names: list[str] = list(info.class_names)
        self._wrapped: dict[str, nn.Module] = {}  # `wrap`'s, by trainable model

    def param_groups(self, model: str) -> list[dict[str, Any]]:
        """The parameter groups of one trainable model, each with its lr multiplier: one group,
        or a `Model`'s own (`lr_groups()`: (parameters, multiplier) pairs, and a weight decay
        multiplier where it decays at the base lr); frozen parameters and groups left empty are
        left out."""
        module = self.models[model]
        groups = module.lr_groups() if isinstance(module, Model) else [(list(module.parameters()), 1.0)]
        at_base = isinstance(module, Model) and module.decay_at_base_lr
        trainable = [([p for p in params if p.requires_grad], scale) for params, scale in groups]
        return [{"params": params, "lr_scale": scale, **({"decay_scale": 1.0 / scale} if at_base else {})}
                for params, scale in trainable if params]

    def wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Each trainable model's training forward goes through `wrap(model)` from now on: with
        several processes, its DistributedDataParallel wrapper. The models themselves, which
        checkpoints hold, stay in `models`."""
        self._wrapped = {name: wrap(self.models[name]) for name in self.trainable}

    def wrapped(self, name: str) -> nn.Module:
        """What a training step calls for the forward of model `name` when that phase trains it:
        DDP averages a model's gradients over the processes only in a backward that follows a
        forward through its wrapper. A model held fixed in a phase, eval and sampling call
        `models[name]`."""
        return self._wrapped.get(name, self.models[name])

    def to(self, device: torch.device) -> None:
        for model in self.models.values():
            model.to(device)

    def train(self, mode: bool = True) -> None:
        for model in self.models.values():
            model.train(mode)

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        """Forward, backward and update on one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        """Losses and sums for one evaluation batch (no updates)."""
        raise NotImplementedError

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        """Metrics from totals: by default each loss averaged over the items."""
        count = max(totals.count, 1.0)
        return {name: value / count for name, value in totals.losses.items()}

    # ------------------------------------------------------------------ hooks

    def example_inputs(self, batch: tuple[torch.Tensor, ...]) -> Sample | None:
        """Training inputs as the data gives them (before preparation), for TensorBoard."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """A new epoch's first batch is next (not called when resuming mid-epoch)."""

    def on_eval_start(self) -> None:
        """An evaluation pass is about to begin."""

    def on_epoch_end(self, epoch: int) -> Sample | None:
        """Something to keep after each epoch (an image grid, text), or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State outside the models that a resumed run needs (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` gave."""

    def classifier(self) -> nn.Module | None:
        """The model that classifies the data's inputs (logits per class), for `kdl predict` and
        as the feature space of `kdl eval --features`; None: the task has none."""
        return None

    def export(self, batch: tuple[torch.Tensor, ...], prepare: Prepare) -> Export | None:
        """What `kdl export` writes, with `batch` (a raw batch of the data, before `prepare`, the
        data's preparation) as its example inputs; None: the task has nothing to export."""
        return None

    def predicts(self) -> bool:
        """Whether `kdl predict` works with this task's runs (its `predict`): by default when
        it has a classifier."""
        return self.classifier() is not None

    @torch.no_grad()
    def predict(self, batch: tuple[torch.Tensor, ...], items: list[str], request: PredictRequest
                ) -> list[Prediction]:
        """`kdl predict` on a prepared batch of new inputs (`items`, as given): by default the
        classifier's `top_k` likeliest classes of each, with their probabilities."""
        *inputs, _ = batch
        probabilities = self.classifier()(*inputs).float().softmax(dim=1)  # (B, num_classes)
        values, indices = probabilities.topk(min(request.top_k, probabilities.shape[1]), dim=1)
        predictions = []
        for item, row, index in zip(items, values.tolist(), indices.tolist(), strict=True):
            classes = [(self.class_names[i], p) for i, p in zip(index, row, strict=True)]
            predictions.append(Prediction(
                item, [f"{name} {p:.3f}" for name, p in classes],
                {"classes": [{"class": name, "probability": round(p, 6)} for name, p in classes]}))
        return predictions

    def check_predict(self, request: PredictRequest) -> None:
        """Refuse `kdl predict` options this task's `predict` would ignore."""
        self._refuse_foreign("kdl predict", PREDICT_FLAGS, request.given, self.predict_options, "")

    def check_sample(self, request: SampleRequest) -> None:
        """Refuse a request for what this task cannot draw, or with options it would ignore."""
        if not self.can_sample:
            raise KdlError(
                f"a {self.name} run has nothing to sample: `kdl sample` draws from generative runs "
                "(gan, language_model, vae)"
            )
        self._refuse_foreign("kdl sample", SAMPLE_FLAGS, request.given, self.sample_options,
                             f", which draws {self.draws}")

    def _refuse_foreign(self, command: str, flags: dict[str, str], given: frozenset[str],
                        own: tuple[str, ...], what: str) -> None:
        """Refuse the options of `flags` that were `given` but are not among this task's `own`
        (`what`: what the run does, said after its name)."""
        foreign = [flags[name] for name in flags if name in given and name not in own]
        if foreign:
            options = ", ".join(flags[name] for name in own) or "none"
            also = " (and --seed)" if command == "kdl sample" else ""
            raise KdlError(
                f"{command}: {' and '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not "
                f"apply to a {self.name} run{what}; its options are {options}{also}. Leave "
                f"{'it' if len(foreign) == 1 else 'them'} out."
            )

    @property
    def draws(self) -> str:
        return "images" if self.draws_images else "text"

    def sample(self, request: SampleRequest) -> Sample:
        """New samples as `kdl sample` asks for them (a task that sets `can_sample`)."""
        raise NotImplementedError


@torch.no_grad()
def evaluate(
    task: Task,
    batches: Batches,
    prepare: Prepare,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    detailed: bool = False,
) -> dict[str, Any]:
    """Run the task's eval step over every batch, add up on the device, summarise on the host."""
    task.train(False)
    task.on_eval_start()
    count, losses, sums = 0, {}, {}
    for batch in batches.epoch():
        with autocast():
            result = task.eval_step(prepare(batch, None), detailed)
        count += result.count
        for name, loss in result.losses.items():
            weighted = loss.float() * result.count
            losses[name] = losses[name] + weighted if name in losses else weighted
        for name, value in result.sums.items():
            sums[name] = sums[name] + value if name in sums else value
    task.train(True)
    totals = Totals(
        count=float(count),
        losses={k: float(v) for k, v in losses.items()},
        sums={k: (v.cpu() if isinstance(v, torch.Tensor) and v.dim() else float(v))
              for k, v in sums.items()},
    )
    return task.summarize(totals, detailed)

