"""The task families' config branches: classification, character language modelling, GANs,
VAEs, semantic segmentation."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .families import KIND_WORDS, DataConfig, ModelConfig, TaskConfig, register

RECURRENT = ("lstm", "gru", "rnn")


@register
class ClassifyConfig(TaskConfig):
    """Classification: cross-entropy, accuracy; per-class accuracy and a confusion matrix in eval."""

    BUILD: ClassVar[str] = "karpathy_runner.tasks.classify:Classify"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "accuracy": "max"}
    DEFAULT_METRIC: ClassVar[str] = "val.loss"
    # data kind -> model families
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {
        "image": ("cnn", "speedrun", "torchvision"), "image_rows": RECURRENT, "text": RECURRENT,
    }

    name: Literal["classify"] = Field("classify", description="Classification of images, image rows or "
                                      "texts into the data's classes.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Training targets put 1 - s on the true class and spread s over all classes; eval "
        "reports the plain cross-entropy, so val.loss stays comparable across settings.",
    )
    eval_flip: bool = Field(
        False,
        description="Evaluation averages the logits of each image and of its mirror image (test-time "
        "augmentation); whole images only.",
    )

    def problems(self, model: ModelConfig, data: DataConfig) -> list[str]:
        kind = data.kind()
        if self.eval_flip and kind != "image":
            return [f"task.eval_flip: mirroring applies to whole images; data.name {data.name!r} "
                    f"gives {KIND_WORDS.get(kind, kind)} data. Set task.eval_flip: false"]
        return []


@register
class LanguageModelConfig(TaskConfig):
    """Next-character prediction: loss in nats per character, bits per character, perplexity."""

    BUILD: ClassVar[str] = "karpathy_runner.tasks.language_model:LanguageModel"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "bpc": "min", "perplexity": "min"}
    DEFAULT_METRIC: ClassVar[str] = "val.loss"
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {"chars": RECURRENT}

    name: Literal["language_model"] = Field("language_model", description="Next-character prediction "
                                            "on a character corpus.")
    carry_hidden: bool = Field(
        True,
        description="Truncated backprop through time: batches walk through the corpus in order, each "
        "row a stream, and the hidden state carries from one batch to the next (detached); false: "
        "windows in random order, each from a zero state.",
    )
    sample_length: int = Field(300, ge=0, description="Characters sampled after each epoch (0: none).")
    sample_temperature: float = Field(0.8, gt=0.0, description="The logits are divided by this before "
                                      "each character is drawn: below 1 safer, above 1 wilder; also "
                                      "kdl sample's default.")


@register
class GANTaskConfig(TaskConfig):
    """Adversarial training in two labelled phases per step: the discriminator, then (every
    d_steps steps) the generator. No metric of training measures sample quality, so there is no
    best checkpoint by default (best.pt follows last.pt); `kdl eval --features RUN` measures it."""

    BUILD: ClassVar[str] = "karpathy_runner.tasks.gan:GAN"
    MODELS: ClassVar[tuple[str, ...]] = ("generator", "discriminator")
    # d_real / d_fake: the discriminator's mean belief that real / generated images are real
    METRICS: ClassVar[dict[str, str]] = {"d_loss": "min", "g_loss": "min", "d_real": "max",
                                         "d_fake": "min"}
    DEFAULT_METRIC: ClassVar[str | None] = None
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {"image": ("gan",)}

    name: Literal["gan"] = Field("gan", description="Adversarial training of a generator and a "
                                 "discriminator.")
    loss: Literal["bce", "hinge"] = Field("bce", description="bce: the non-saturating loss of the DCGAN "
                                          "paper; hinge: the hinge loss.")
    d_steps: int = Field(1, ge=1, description="Discriminator updates per generator update.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="bce: real images labelled 1 - s.")
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0, description="Decay of the exponential moving "
                                    "average of the generator's weights, which draws the samples; null: "
                                    "samples from the raw generator.")
    grid_size: int = Field(64, ge=1, description="Images in each epoch's sample grid (fixed noise).")


@register
class VAETaskConfig(TaskConfig):
    """Variational autoencoding: the loss is the negative evidence lower bound (ELBO) in nats per
    image, a reconstruction term plus beta times the KL divergence of the latent from N(0, I);
    `kdl eval --features RUN` also scores samples from the prior as it does a GAN's."""

    BUILD: ClassVar[str] = "karpathy_runner.tasks.vae:VAE"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)
    # loss: what is trained (beta and the warm-up applied); nelbo = recon + kl: the bound itself
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "nelbo": "min", "recon": "min", "kl": "min"}
    DEFAULT_METRIC: ClassVar[str] = "val.nelbo"
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {"image": ("vae",)}

    name: Literal["vae"] = Field("vae", description="Variational autoencoding of images.")
    beta: float = Field(1.0, gt=0.0, description="The weight of the KL term in the trained loss (a "
                        "beta-VAE above 1); the reported nelbo always weighs it 1.")
    kl_warmup_steps: int = Field(0, ge=0, description="The KL weight rises linearly from 0 to beta over "
                                 "this many steps (KL annealing); 0: beta from the first step.")
    grid_size: int = Field(64, ge=1, description="Images in each epoch's grid of samples from the prior "
                           "(fixed noise); the grid of reconstructions beside it shows 32 training "
                           "images, each beside its reconstruction.")


@register
class SegmentConfig(TaskConfig):
    """Semantic segmentation: per-pixel cross-entropy with the ignore index 255 left out; pixel
    accuracy and mean IoU (intersection over union, averaged over the classes present in the
    labels or the predictions); per-class IoU in eval."""

    BUILD: ClassVar[str] = "karpathy_runner.tasks.segment:Segment"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "pixel_accuracy": "max", "miou": "max"}
    DEFAULT_METRIC: ClassVar[str] = "val.miou"
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {"segmentation": ("unet", "fcn", "deeplabv3", "lraspp")}

    name: Literal["segment"] = Field("segment", description="Semantic segmentation: a class for every "
                                     "pixel.")
    aux_weight: float = Field(0.5, ge=0.0, description="The weight of the auxiliary head's loss, for "
                              "models that have one (model.aux_loss: true).")


@register
class DetectConfig(TaskConfig):
    """Object detection: torchvision's detection losses summed (classification and box
    regression, and the proposals' for Faster R-CNN); COCO's mAP (averaged over IoU 0.5 to
    0.95), mAP@0.5, mAP@0.75 and mAR@100 in evaluation, per-class AP in a detailed eval."""

    BUILD: ClassVar[str] = "karpathy_runner.tasks.detect:Detect"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)
    METRICS: ClassVar[dict[str, str]] = {"loss": "min", "map": "max", "map_50": "max", "map_75": "max",
                                         "mar_100": "max"}
    DEFAULT_METRIC: ClassVar[str] = "val.map"
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {
        "detection": ("fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn",
                      "ssdlite320_mobilenet_v3_large")}

    name: Literal["detect"] = Field("detect", description="Object detection: boxes and their classes.")
