"""The model families' config branches: conv nets, recurrent nets, DCGAN, a VAE, the speedrun
net, torchvision's classifiers."""

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

    name: Literal["cnn"] = Field("cnn", description="The conv net for image classification.")
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [32, 64],
        description="Output channels of each conv stage, one stage per entry (at least one).",
    )
    kernel_size: int = Field(3, ge=1, description="The convolutions' kernel side; odd, so that 'same' "
                             "padding keeps the image size and only pooling halves it.")
    batch_norm: bool = Field(False, description="Batch norm after each conv (which then has no bias).")
    pool: Literal["max", "avg", "none"] = Field("max", description="The 2x2 pooling after each stage "
                                                "(while the feature map is at least 2x2); none: no pooling.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability before each linear layer "
                           "of the classifier.")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Widths of the classifier's hidden linear layers (each with a ReLU) before the "
        "output layer; []: one linear layer from the features to the logits.",
    )

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

    name: Literal["lstm", "gru", "rnn"] = Field("lstm", description="The recurrent cell: torch's nn.LSTM, "
                                                 "nn.GRU or nn.RNN (tanh).")
    embedding_size: int = Field(128, ge=1, description="Size of the token (word or character) embedding; "
                                "image rows go in as they are.")
    hidden_size: int = Field(256, ge=1, description="Size of the hidden state of each layer (and "
                             "direction).")
    layers: int = Field(2, ge=1, description="Stacked recurrent layers.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability between layers and "
                           "before the head.")
    bidirectional: bool = Field(False, description="Classification only: also read each sequence "
                                "backwards, the head seeing both directions.")
    pooling: Literal["last", "mean"] = Field("last", description="Classification: the head reads the "
                                             "final state (last) or the mean over each sequence's true "
                                             "length (mean).")
    tie_weights: bool = Field(False, description="Language model: the output layer shares the "
                              "embedding's weights (needs embedding_size == hidden_size).")

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

    name: Literal["gan"] = Field("gan", description="DCGAN's generator and discriminator.")
    latent_size: int = Field(100, ge=1, description="Size of the noise vector z.")
    width: int = Field(64, ge=1, description="Feature maps of the layer next to the image (ngf, ndf); "
                       "they double at each layer away from it.")
    batch_norm: bool = Field(True, description="Batch norm in the generator, and in the discriminator "
                             "unless spectral_norm.")
    spectral_norm: bool = Field(False, description="Spectral norm on the discriminator's layers (instead "
                                "of batch norm there).")


@register
class VAEModelConfig(ModelConfig):
    """A convolutional variational autoencoder sized like DCGAN from the data's image shape: an
    encoder of strided convolutions down to the mean and log-variance of a Gaussian latent, and a
    decoder of transposed convolutions back up to a Bernoulli or Gaussian distribution over the
    pixels."""

    BUILD: ClassVar[str] = "karpathy_runner.models.vae:build"

    name: Literal["vae"] = Field("vae", description="A convolutional VAE.")
    latent_size: int = Field(16, ge=1, description="Size of the Gaussian latent z.")
    width: int = Field(32, ge=1, description="Feature maps of the layer next to the image, in the encoder "
                       "and the decoder; they double at each layer away from it.")
    batch_norm: bool = Field(True, description="Batch norm after the hidden convolutions of both "
                             "networks.")
    decoder: Literal["bernoulli", "gaussian"] = Field(
        "bernoulli",
        description="The distribution of each pixel (scaled to [0, 1]) given z: bernoulli (the decoder "
        "gives logits; the classic choice for MNIST) or gaussian (the decoder gives means, with one "
        "learned standard deviation per channel).",
    )


@register
class SpeedrunConfig(ModelConfig):
    """A fast CIFAR-10 network after airbench94's published ideas (see models/speedrun.py):
    a stem, conv groups with batch norm and GELU, a global max pool, scaled-down logits."""

    BUILD: ClassVar[str] = "karpathy_runner.models.speedrun:build"

    name: Literal["speedrun"] = Field("speedrun", description="The airbench94-style CIFAR-10 network.")
    stem_width: int = Field(24, ge=1, description="Output channels of the 2x2 stem conv.")
    widths: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [64, 256, 256],
        description="Output channels of each conv group (two 3x3 convs and a 2x2 max pool; at least one).",
    )
    bn_momentum: float = Field(0.4, gt=0.0, le=1.0, description="Batch norm's momentum in torch's "
                               "convention: the weight of the new batch in the running statistics.")
    logit_scale: float = Field(1 / 9, gt=0.0, description="The logits are multiplied by this, which keeps "
                               "the early softmax soft at a high lr.")
    bias_lr_scale: float = Field(64.0, gt=0.0, description="The batch-norm shifts learn this many times "
                                 "faster than the weights (optimizer.lr times this).")

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

    name: Literal["torchvision"] = Field("torchvision", description="A classifier from torchvision's "
                                         "model zoo, chosen by arch.")
    arch: str = Field("resnet18", description="Any name of "
                      "torchvision.models.list_models(torchvision.models).")
    pretrained: str = Field(
        "none",
        description="none: random init; imagenet: torchvision's published weights (downloaded once into "
        "the torch cache); else the path of a local state dict of this arch "
        "(torch.save(model.state_dict())).",
    )
    freeze: str = Field(
        "none",
        description="none; backbone (all but the head); or until:<layer> (that module and all before it, "
        "e.g. until:layer2 for a resnet). Frozen batch norm keeps its statistics (eval mode).",
    )
    backbone_lr_scale: float = Field(1.0, gt=0.0, description="The backbone's lr is optimizer.lr times "
                                     "this; the new head's is optimizer.lr.")

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


@register
class UNetConfig(ModelConfig):
    """A small U-Net for segmentation from scratch: per level two 3x3 convs (batch norm, ReLU),
    a 2x2 max pool down; back up by 2x2 transposed convs, each level joined with the encoder's
    features of its size; a 1x1 conv to the class logits at every pixel."""

    BUILD: ClassVar[str] = "karpathy_runner.models.unet:build"

    name: Literal["unet"] = Field("unet", description="The U-Net for semantic segmentation.")
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [16, 32, 64, 128],
        description="Output channels of each level, the first at full resolution, each next at half "
        "(at least two levels).",
    )
    batch_norm: bool = Field(True, description="Batch norm after each conv (which then has no bias).")

    @field_validator("channels")
    @classmethod
    def _levels(cls, channels: list[int]) -> list[int]:
        if len(channels) < 2:
            raise ValueError("needs at least two levels, e.g. [16, 32, 64, 128]")
        return channels


SEGMENTATION_ARCHS = {"fcn": ("resnet50", "resnet101"), "deeplabv3": ("resnet50", "resnet101",
                      "mobilenet_v3_large"), "lraspp": ("mobilenet_v3_large",)}


@register
class TorchvisionSegmentationConfig(ModelConfig):
    """torchvision's segmentation models (torchvision.models.segmentation) with their last
    convolutions replaced for the data's classes: FCN, DeepLabV3 and LR-ASPP on their backbones.
    Pretrained weights are read from the torch cache; missing ones are downloaded only with
    download: true, else the model starts from random weights and says so on stderr."""

    BUILD: ClassVar[str] = "karpathy_runner.models.segmentation:build"

    name: Literal["fcn", "deeplabv3", "lraspp"] = Field(
        "deeplabv3", description="The architecture: fcn, deeplabv3 or lraspp (torchvision's).")
    backbone: Literal["resnet50", "resnet101", "mobilenet_v3_large"] = Field(
        "mobilenet_v3_large", description="The backbone: resnet50 or resnet101 (fcn, deeplabv3), "
        "mobilenet_v3_large (deeplabv3, lraspp).")
    weights: Literal["full", "backbone", "none"] = Field(
        "full",
        description="full: torchvision's weights of the whole model (trained on COCO with VOC's 21 "
        "classes); backbone: the backbone's ImageNet weights; none: random weights.",
    )
    download: bool = Field(False, description="Download weights missing from the torch cache; false: "
                           "use what is cached (the backbone's when the whole model's is missing), "
                           "else random weights, with a note on stderr.")
    aux_loss: bool = Field(False, description="fcn, deeplabv3: train an auxiliary head on the backbone's "
                           "third stage too (its loss weighted by task.aux_weight).")
    backbone_lr_scale: float = Field(1.0, gt=0.0, description="The backbone's lr is optimizer.lr times "
                                     "this; the heads' is optimizer.lr.")

    @model_validator(mode="after")
    def _pair(self) -> TorchvisionSegmentationConfig:
        backbones = SEGMENTATION_ARCHS[self.name]
        if self.backbone not in backbones:
            raise ValueError(f"model.backbone: torchvision has no {self.name} on {self.backbone}; "
                             f"choose {' or '.join(backbones)}")
        if self.aux_loss and self.name == "lraspp":
            raise ValueError("model.aux_loss: lraspp has no auxiliary head; set model.aux_loss: false")
        return self

    def preprocessing(self) -> Any:
        """Pretrained weights expect ImageNet's normalisation (the sizes are the data's own)."""
        if self.weights == "none":
            return None
        return importlib.import_module("karpathy_runner.models.segmentation").preprocessing()

    def shapes_only(self) -> TorchvisionSegmentationConfig:
        return self.model_copy(update={"weights": "none"})


@register
class TorchvisionDetectionConfig(ModelConfig):
    """torchvision's detection models (torchvision.models.detection) for the data's classes:
    Faster R-CNN, RetinaNet and SSDlite. The backbone's ImageNet weights are read from the torch
    cache when there (or downloaded with download: true); else the model starts from random
    weights and says so on stderr."""

    BUILD: ClassVar[str] = "karpathy_runner.models.detection:build"

    name: Literal["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn",
                  "ssdlite320_mobilenet_v3_large"] = Field(
        "fasterrcnn_mobilenet_v3_large_fpn", description="The architecture, as torchvision names it.")
    weights: Literal["backbone", "none"] = Field(
        "backbone", description="backbone: the backbone's ImageNet weights (when cached, or with "
        "download: true); none: random weights.")
    download: bool = Field(False, description="Download weights missing from the torch cache; false: "
                           "random weights, with a note on stderr.")
    min_size: int | None = Field(None, ge=16, description="The side torchvision's transform resizes "
                                 "images to (R-CNN, RetinaNet; SSDlite resizes to 320); null: the "
                                 "data's image size, so small images stay small.")
    proposals_per_image: int = Field(300, ge=1, description="fasterrcnn: the region proposals kept per "
                                     "image after non-maximum suppression (of three times as many "
                                     "scored); torchvision's 2000 suit large images with many objects.")
    rois_per_image: int = Field(128, ge=1, description="fasterrcnn: the proposals sampled per training "
                                "image for the box head's loss (torchvision's 512); the head's cost "
                                "grows with it.")
    detections_per_image: int = Field(100, ge=1, description="The most boxes kept per image after "
                                      "non-maximum suppression (mAR@100 counts up to 100).")
    score_threshold: float = Field(0.05, ge=0.0, lt=1.0, description="Detections scoring below this "
                                   "are dropped.")

    def shapes_only(self) -> TorchvisionDetectionConfig:
        return self.model_copy(update={"weights": "none"})
