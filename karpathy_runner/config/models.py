"""The model families' config branches: conv nets, recurrent nets, DCGAN, the speedrun net,
torchvision's classifiers."""

from __future__ import annotations

import importlib
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from .families import DataConfig, ModelConfig, register


@register
class CNNConfig(ModelConfig):
    """A conv stack: per stage conv(k, same padding) -> [batch norm] -> ReLU -> pool 2."""

    BUILD: ClassVar[str] = "karpathy_runner.models.cnn:build"

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


@register
class RNNConfig(ModelConfig):
    """A recurrent network, the cell chosen by name (torch's nn.RNN, nn.LSTM, nn.GRU): tokens
    through an embedding (image rows go in as they are), then a classification head on the final
    state or the mean over the true length, or a language-model head at every step."""

    BUILD: ClassVar[str] = "karpathy_runner.models.rnn:build"

    name: Literal["lstm", "gru", "rnn"] = "lstm"
    embedding_size: int = Field(128, ge=1)
    hidden_size: int = Field(256, ge=1)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # between layers and before the head
    bidirectional: bool = False  # classification only
    pooling: Literal["last", "mean"] = "last"  # classification: final state or mean over steps
    tie_weights: bool = False  # language model: output layer shares the embedding's weights

    def problems(self, data: DataConfig) -> list[str]:
        kind = data.kind()
        if self.bidirectional and kind == "chars":
            return ["model.bidirectional: a language model predicts each next character from the "
                    "ones before it only; set model.bidirectional: false"]
        if self.tie_weights and kind != "chars":
            return ["model.tie_weights: only a language model has an output layer the size of its "
                    "vocabulary to tie; set model.tie_weights: false"]
        return []

    @model_validator(mode="after")
    def _tying(self) -> RNNConfig:
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ValueError(
                f"model.tie_weights: true needs model.embedding_size == model.hidden_size "
                f"(got {self.embedding_size} and {self.hidden_size})"
            )
        return self


@register
class GANModelConfig(ModelConfig):
    """DCGAN: a generator of transposed convolutions from a latent vector up to the data's image
    size, and a discriminator of strided convolutions down to one logit, sized from the data."""

    BUILD: ClassVar[str] = "karpathy_runner.models.gan:build"

    name: Literal["gan"] = "gan"
    latent_size: int = Field(100, ge=1)  # the noise vector z
    width: int = Field(64, ge=1)  # feature maps of the layer next to the image (ngf, ndf)
    batch_norm: bool = True  # in the generator, and in the discriminator unless spectral norm
    spectral_norm: bool = False  # on the discriminator's layers (instead of batch norm there)


@register
class SpeedrunConfig(ModelConfig):
    """A fast CIFAR-10 network after airbench94's published ideas (see models/speedrun.py):
    a stem, conv groups with batch norm and GELU, a global max pool, scaled-down logits."""

    BUILD: ClassVar[str] = "karpathy_runner.models.speedrun:build"

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


@register
class TorchvisionConfig(ModelConfig):
    """A torchvision classification model (resnet18, mobilenet_v3_small, efficientnet_b0, ...)
    with its last linear layer (the head) replaced for the data's classes; optionally from
    pretrained weights, with a frozen or slower backbone (transfer learning)."""

    BUILD: ClassVar[str] = "karpathy_runner.models.zoo:build"

    name: Literal["torchvision"] = "torchvision"
    arch: str = "resnet18"  # any name of torchvision.models.list_models(torchvision.models)
    # none: random init; imagenet: torchvision's published weights (downloaded once into the
    # torch cache); else the path of a local state dict of this arch (torch.save(model.state_dict()))
    pretrained: str = "none"
    # none | backbone (all but the head) | until:<layer> (that module and all before it, e.g.
    # until:layer2 for a resnet); frozen batch norm keeps its statistics (eval mode)
    freeze: str = "none"
    backbone_lr_scale: float = Field(1.0, gt=0.0)  # the backbone's lr is optimizer.lr times this

    def preprocessing(self) -> Any:
        """The resize, crop and normalisation the pretrained weights were trained with."""
        if self.pretrained == "none":
            return None
        return importlib.import_module("karpathy_runner.models.zoo").preprocessing(self)

    def shapes_only(self) -> TorchvisionConfig:
        return self.model_copy(update={"pretrained": "none"})

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, freeze: str) -> str:
        if not FREEZE_PATTERN.match(freeze):
            raise ValueError(f"must be none, backbone or until:<layer> (e.g. until:layer2), got {freeze!r}")
        return freeze
