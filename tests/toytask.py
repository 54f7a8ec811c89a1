"""A toy task family with two models and two optimizers, added from outside the package the way
any family is: its config class (options and declarations, BUILD naming its task class) and its
task class, registered with one call (the `toy` fixture of the tests calls `register`, and takes
it out again after each test). And a toy model family for a task of kdl's own (`ToyMLPConfig`),
added the same way.

Like a GAN it updates its models in two labelled phases per step: the head on the encoder's
features held fixed, then the encoder through the updated head. Its encoder's conv layers train
at `conv_lr_scale` times the encoder's lr, and it has every hook: example inputs, a picture of
its first conv filters after each epoch, and random images for `kdl sample`. `poison_step` and
`poison_phase` make one phase of one step produce NaN, to test the non-finite policies.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from karpathy_runner.config.families import ModelConfig, TaskConfig
from karpathy_runner.data import DataInfo
from karpathy_runner.models import build_model
from karpathy_runner.tasks import Sample, SampleRequest, StepResult, Task, Totals, Updater


class ToyPairConfig(TaskConfig):
    BUILD: ClassVar[str] = f"{__name__}:ToyPair"
    MODELS: ClassVar[tuple[str, ...]] = ("encoder", "head")
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "head_loss": "min", "accuracy": "max"}
    DEFAULT_METRIC: ClassVar[str] = "val.loss"
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {"image": ("cnn",)}

    name: Literal["toy_pair"] = "toy_pair"
    conv_lr_scale: float = Field(0.1, gt=0.0)
    poison_step: int | None = None  # training step (counted from 1) that goes NaN
    poison_phase: Literal[1, 2] = 2


class ToyPair(Task):
    can_sample = True
    sample_options = ("n",)

    def __init__(self, cfg: ToyPairConfig, model_cfg: ModelConfig, info: DataInfo, device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"encoder": build_model(model_cfg, info),  # (B, C, H, W) -> (B, classes)
                       "head": nn.Linear(info.num_classes, info.num_classes)}
        self.image_shape = (info.in_channels, *info.image_size)

    def param_groups(self, model: str) -> list[dict[str, Any]]:
        if model != "encoder":
            return super().param_groups(model)
        encoder = self.models["encoder"]
        convs = [p for p in encoder.features.parameters() if p.requires_grad]
        rest = [p for p in encoder.classifier.parameters() if p.requires_grad]
        return [{"params": convs, "lr_scale": self.cfg.conv_lr_scale},
                {"params": rest, "lr_scale": 1.0}]

    def _poisoned(self, x: torch.Tensor, step: int, phase: int) -> torch.Tensor:
        if self.cfg.poison_step == step + 1 and self.cfg.poison_phase == phase:
            return x * float("nan")
        return x

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        encoder, head = self.models["encoder"], self.models["head"]
        x, y = batch
        # phase 1: update the head on the encoder's features, held fixed
        with updater.autocast():
            features = encoder(self._poisoned(x, step, 1)).detach()  # (B, classes)
            head_loss = F.cross_entropy(self.wrapped("head")(features), y)
        updater.step("head", head_loss)
        # phase 2: update the encoder through the updated head
        with updater.autocast():
            logits = head(self.wrapped("encoder")(self._poisoned(x, step, 2)))
            loss = F.cross_entropy(logits, y)
        updater.step("encoder", loss)
        correct = (logits.detach().argmax(1) == y).sum()
        return StepResult(count=y.shape[0], losses={"loss": loss.detach(), "head_loss": head_loss.detach()},
                          sums={"correct": correct})

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        x, y = batch
        logits = self.models["head"](self.models["encoder"](x)).float()
        loss = F.cross_entropy(logits, y)
        return StepResult(count=y.shape[0], losses={"loss": loss, "head_loss": loss},
                          sums={"correct": (logits.argmax(1) == y).sum()})

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        return {**super().summarize(totals), "accuracy": totals.sums["correct"] / max(totals.count, 1.0)}

    def example_inputs(self, batch: tuple[torch.Tensor, ...]) -> Sample:
        return Sample(images=batch[0][:8])

    def on_epoch_end(self, epoch: int) -> Sample:
        """The first conv layer's filters, one small gray image each."""
        weight = self.models["encoder"].features[0].weight.detach().float().cpu()  # (out, in, k, k)
        filters = weight[:, :1]
        low, high = filters.min(), filters.max()
        return Sample(images=((filters - low) / (high - low + 1e-12) * 255).round().to(torch.uint8))

    def sample(self, request: SampleRequest) -> Sample:
        generator = torch.Generator().manual_seed(request.seed)
        return Sample(images=torch.randint(0, 256, (request.n, *self.image_shape),
                                           generator=generator, dtype=torch.uint8))


class ToyMLPConfig(ModelConfig):
    """A model family for a task that does not name it: kdl's own classify task trains it
    because the model says so (TASKS: task -> the data kinds it serves)."""

    BUILD: ClassVar[str] = f"{__name__}:build_mlp"
    TASKS: ClassVar[dict[str, tuple[str, ...]]] = {"classify": ("image",)}

    name: Literal["toy_mlp"] = "toy_mlp"
    hidden: int = Field(32, ge=1)


def build_mlp(cfg: ToyMLPConfig, info: DataInfo) -> nn.Module:
    """Flattened images -> one hidden layer -> class logits."""
    pixels = info.in_channels * info.image_size[0] * info.image_size[1]
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, cfg.hidden), nn.ReLU(),
                         nn.Linear(cfg.hidden, info.num_classes))  # (B, C, H, W) -> (B, classes)
