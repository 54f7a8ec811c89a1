"""`kdl eval` and `kdl sample`: a run rebuilt from its config.yaml with a checkpoint's weights,
evaluated on a split or drawn from; a generator's images scored against real ones.

How good an image generator's samples are is measured in the feature space of a classifier:
the Frechet distance between the two sets of features (torchmetrics' implementation, given our
features), a classifier score (the Inception score's analogue: how confidently and how variously
the classifier labels the samples) and class coverage (the share of the classes that the
classifier finds among the samples). Two classifiers can serve: the penultimate layer of a kdl
classification run on the same data (`kdl eval GAN_RUN --features CNN_RUN`), or torchvision's
Inception-v3 when its ImageNet weights are already in the local torch cache. Every metric's name
carries the classifier's, because numbers from different feature spaces cannot be compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import (
    Experiment,
    build_experiment,
    check_versions,
    checkpoint_must_fit,
    eval_batches,
    resolve_device,
)
from .config.loading import load_config
from .data import Batches
from .errors import KdlError
from .runfolder import fsio, layout
from .runfolder.checkpoint import check_vocabulary, load_checkpoint
from .runfolder.reader import Run, refuse_damaged, resolve_run
from .runfolder.writer import RunWriter, sample_bytes, sample_parts, sample_suffix
from .tasks import Sample, SampleRequest
from .tasks.base import evaluate
from .updater import autocast_for


@dataclass
class Loaded:
    """A finished or running run rebuilt from its config.yaml, with a checkpoint's weights."""

    run: Run
    exp: Experiment
    checkpoint: str
    state: dict[str, Any]


def load_run(runs_root: Path, ref: str, checkpoint: str, device: str) -> Loaded:
    check_versions()  # before anything is unpickled
    resolve_device(device, "--device")  # a bad --device is said first
    run = resolve_run(runs_root, ref)
    refuse_damaged(run)
    cfg = load_config(run.path / layout.CONFIG)
    path = run.checkpoint(checkpoint)
    if not path.is_file():
        other = "last" if checkpoint == "best" else "best"
        raise KdlError(
            f"run {run.id} has no checkpoints/{checkpoint}.pt yet"
            + (f"; try --checkpoint {other}" if run.checkpoint(other).is_file() else
               "; a run writes its checkpoints at the end of each epoch (and every "
               "train.checkpoint_every_steps steps): evaluate it once it has")
        )
    state = load_checkpoint(path)
    exp = build_experiment(cfg, device_override=device, training=False,
                           vocabulary=run.vocabulary())
    check_vocabulary(state, exp.data.info.vocabulary, path, run.path / layout.VOCAB)
    with checkpoint_must_fit(path):
        for name, model in exp.task.models.items():
            model.load_state_dict(state["models"][name])
    return Loaded(run, exp, checkpoint, state)


def eval_precision(precision: str, device: torch.device) -> str:
    """The run's precision, so eval repeats training's numbers; fp16 has no CPU path: fp32."""
    return "fp32" if precision == "fp16" and device.type == "cpu" else precision


def evaluate_run(
    runs_root: Path, ref: str, checkpoint: str = "best", split: str = "val", device: str = "auto",
    features: str | None = None,
) -> tuple[Run, dict[str, Any]]:
    """Rebuild data and model from the run's config.yaml, load a checkpoint, evaluate a split
    under the run's precision. A task that draws images (a GAN) also has its samples scored
    against the split's images in a classifier's feature space: the run `features`, else
    Inception-v3 if its weights are in the torch cache; where neither is at hand, a task whose
    scores are optional (a VAE, whose bound is its own measure) reports its own metrics alone."""
    loaded = load_run(runs_root, ref, checkpoint, device)
    writer = RunWriter(loaded.run.path)  # (refuses a run folder it cannot write, before the work)
    exp, cfg = loaded.exp, loaded.exp.cfg
    dataset = exp.data.split(split)
    if dataset is None:
        raise KdlError(f"the {cfg.data.name} data of run {loaded.run.id} has no {split} split: "
                       f"{cfg.data.missing_split(split)}")
    precision = eval_precision(cfg.train.precision, exp.device)
    autocast = autocast_for(precision, exp.device)
    batches = eval_batches(exp, dataset)
    metrics = evaluate(exp.task, batches, exp.prepare, autocast, detailed=True)
    if exp.task.draws_images and (features is not None or not exp.task.scores_optional
                                  or inception_weights().is_file()):
        metrics.update(_sample_quality(runs_root, features, exp, batches, autocast))
    elif features is not None:
        raise KdlError(f"--features scores generated images; run {loaded.run.id} is a "
                       f"{exp.task.name} run, which draws none")
    result = {
        "run": loaded.run.id,
        "checkpoint": checkpoint,
        "split": split,
        "epoch": loaded.state["loop"]["epoch"],
        "step": loaded.state["loop"]["step"],
        "samples": len(dataset),
        "precision": precision,
        "evaluated_at": layout.utc_now(),
        "metrics": metrics,
    }
    writer.write_eval(result)
    return loaded.run, result


def _sample_quality(runs_root: Path, features: str | None, exp: Experiment, batches: Batches,
                    autocast: Any) -> dict[str, Any]:
    """Frechet distance, classifier score and class coverage of as many samples as the split
    has images, each batch of samples from its own seed (0, 1, ...)."""
    if features is None:
        extractor, per_class = inception_features(exp.device), False
    else:
        classifier = load_run(runs_root, features, "best", str(exp.device))
        model = _classifier(classifier, exp)
        extractor = RunFeatures(classifier.run.id, model, classifier.exp.prepare,
                                classifier.exp.data.info.num_classes)
        per_class = True
    seeds = iter(range(len(batches)))

    def generate(n: int) -> Any:
        with autocast():
            return exp.task.sample(SampleRequest(n=n, seed=next(seeds), more=False)).images

    real = (batch[0] for batch in batches.epoch())
    return {**image_quality(real, generate, extractor, per_class), "features": extractor.description}


def _classifier(classifier: Loaded, exp: Experiment) -> nn.Module:
    """The model of --features RUN, which must be a classification run on the same images."""
    info, theirs, model = exp.data.info, classifier.exp.data.info, classifier.exp.task.classifier()
    same = (model is not None and (theirs.kind, theirs.in_channels, theirs.image_size, theirs.class_names)
            == (info.kind, info.in_channels, info.image_size, info.class_names))
    if not same:
        raise KdlError(
            f"--features {classifier.run.id}: the features must come from a classification run "
            f"of a cnn on the same images ({exp.cfg.data.name}: {info.in_channels}x"
            f"{info.image_size[0]}x{info.image_size[1]}, {len(info.class_names)} classes); it is a "
            f"{classifier.exp.task.name} run on {classifier.exp.cfg.data.name}. Train one, e.g. "
            f"kdl train configs/{exp.cfg.data.name}_cnn.yaml, and pass its id."
        )
    return model


def sample_run(runs_root: Path, ref: str, request: SampleRequest, checkpoint: str = "best",
               out: Path | None = None, device: str = "auto") -> tuple[Sample, list[Path]]:
    """`kdl sample`: draw from a run's checkpoint. Images are written (to `out`, else the run's
    samples/ folder), text only when `out` is given; what the task draws besides (Sample.more)
    goes beside it, named with its key (OUT-KEY.png). Returns the sample and the files written,
    its own first."""
    loaded = load_run(runs_root, ref, checkpoint, device)
    task = loaded.exp.task
    # a run folder it cannot write is refused before the work
    writer = RunWriter(loaded.run.path) if out is None and task.draws_images else None
    task.check_sample(request)
    task.train(False)
    with torch.no_grad(), autocast_for(eval_precision(loaded.exp.cfg.train.precision,
                                                      loaded.exp.device), loaded.exp.device)():
        sample = task.sample(request)
    if sample.images is None and out is None:
        return sample, []
    name = f"sample-{checkpoint}-seed{request.seed}-n{request.n}"
    if out is None:
        return sample, (writer or RunWriter(loaded.run.path)).write_sample(name, sample)
    out = Path(out)
    files = [(out.with_name(f"{out.stem}-{key}{sample_suffix(part)}") if key else out, part)
             for key, part in sample_parts(sample)]
    for path, _ in files:  # every path, before any is written
        fsio.check_output(path)
    return sample, [fsio.write_output(path, sample_bytes(part)) for path, part in files]



class Features:
    """uint8 images (N, C, H, W) -> (features (N, d), class probabilities (N, classes))."""

    name: str  # goes into every metric's name
    description: str
    dims: int
    num_classes: int

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class RunFeatures(Features):
    """A kdl classifier: its own preprocessing, the input of its last linear layer as features."""

    def __init__(self, run_id: str, model: nn.Module, prepare: Callable, num_classes: int):
        self.model = model.eval()
        self.prepare = prepare
        self.num_classes = num_classes
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        self.dims = last.in_features
        self._captured: list[torch.Tensor] = []
        last.register_forward_hook(lambda module, inputs, output: self._captured.append(inputs[0]))
        self.name = run_id
        self.description = f"the penultimate layer ({self.dims} values) of classification run {run_id}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.zeros(len(images), dtype=torch.int64)
        x, _ = self.prepare((images, labels), None)
        self._captured.clear()
        logits = self.model(x).float()
        return self._captured[0].flatten(1).float(), logits.softmax(1)


INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's IMAGENET1K_V1 weights


def inception_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class InceptionFeatures(Features):
    """torchvision's Inception-v3: images resized to 299, the 2048 pooled features, ImageNet's
    1000 classes. `weights=None` builds it untrained (for tests of the plumbing only)."""

    name = "inception_v3"
    dims = 2048
    num_classes = 1000

    def __init__(self, device: torch.device, weights: str | None = "IMAGENET1K_V1"):
        from torchvision.models import inception_v3

        model = inception_v3(weights=weights, aux_logits=True, init_weights=weights is None)
        self.classify = model.fc
        model.fc = nn.Identity()
        self.model = model.to(device).eval()
        self.device = device
        self.description = "torchvision's Inception-v3 pooled features (2048 values), ImageNet weights"
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device).float().div(255)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # gray -> RGB
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", antialias=True)
        features = self.model((x - self.mean) / self.std).float()
        return features, self.classify.to(self.device)(features).softmax(1)


def inception_features(device: torch.device) -> InceptionFeatures:
    """Inception-v3 with ImageNet weights, from the torch cache only (never a download here)."""
    if not inception_weights().is_file():
        raise KdlError(
            "kdl eval of a GAN scores its samples in a classifier's feature space, and none is at "
            f"hand: Inception-v3's weights are not in the torch cache ({inception_weights()}). Fix: "
            "pass --features RUN, a kdl classification run on the same data (e.g. one of "
            "configs/digits_cnn.yaml for digits), or put torchvision's Inception-v3 ImageNet "
            f"weights ({INCEPTION_FILE}) in that folder."
        )
    return InceptionFeatures(device)


class _GivenFeatures(nn.Identity):
    """Lets torchmetrics' Frechet distance take features we computed (with their size)."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims


def image_quality(real: Iterable[torch.Tensor], generate: Callable[[int], torch.Tensor],
                  features: Features, per_class: bool) -> dict[str, float]:
    """Frechet distance, classifier score and (with `per_class`, when the classifier's classes
    are the data's) class coverage of generated images against `real` uint8 batches; `generate`
    draws as many images as each real batch has."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    distance = FrechetInceptionDistance(feature=_GivenFeatures(features.dims))
    probabilities = []
    for images in real:
        real_features, _ = features(images)
        fake_features, fake_probabilities = features(generate(len(images)))
        distance.update(real_features.double().cpu(), real=True)
        distance.update(fake_features.double().cpu(), real=False)
        probabilities.append(fake_probabilities.double().cpu())
    p_yx = torch.cat(probabilities)  # (N, classes)
    p_y = p_yx.mean(0, keepdim=True)
    kl = (p_yx * (p_yx.clamp_min(1e-12).log() - p_y.clamp_min(1e-12).log())).sum(1)
    metrics = {f"fd@{features.name}": float(distance.compute()),
               f"classifier_score@{features.name}": math.exp(float(kl.mean()))}
    if per_class:
        found = p_yx.argmax(1).unique().numel()
        metrics[f"class_coverage@{features.name}"] = found / features.num_classes
    return metrics
