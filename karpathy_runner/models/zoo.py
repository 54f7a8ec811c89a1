"""torchvision's classification models for transfer learning.

The model is built by name (torchvision.models.get_model) from random weights, torchvision's
ImageNet weights (its weights API downloads them into the torch cache on first use) or a local
state dict of the same architecture. Its last linear layer, the head, is then replaced by one
for the data's classes. Freezing stops gradients to the backbone (or to the layers up to one),
and frozen batch norm keeps its running statistics: it stays in eval mode while the rest trains.
Pretrained weights bring their own preprocessing (`preprocessing`), which image folders use.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from pathlib import Path

import torch
from torch import nn

from ..config.models import TorchvisionConfig
from ..data import DataInfo, Preprocessing
from ..errors import KdlError
from . import Model

AUX_HEADS = ("inception_v3", "googlenet")  # their training-time side heads are left out


class TorchvisionClassifier(Model):
    """A torchvision model (`net`) whose head (`head_name`) predicts the data's classes; the
    rest of it, the backbone, may learn slower (`backbone_lr_scale`)."""

    def __init__(self, net: nn.Module, head_name: str, in_channels: int, backbone_lr_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.head_name = head_name
        self.in_channels = in_channels
        self.backbone_lr_scale = backbone_lr_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:  # gray images through an RGB network: the same plane thrice
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)  # (B, C, H, W) -> (B, num_classes)

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The backbone at backbone_lr_scale, the new head at the optimizer's lr."""
        if self.backbone_lr_scale == 1.0:
            return super().lr_groups()
        head = {id(p) for p in self.net.get_submodule(self.head_name).parameters()}
        return [([p for p in self.parameters() if id(p) not in head], self.backbone_lr_scale),
                ([p for p in self.parameters() if id(p) in head], 1.0)]

    def train(self, mode: bool = True) -> TorchvisionClassifier:
        super().train(mode)
        for module in self.net.modules():  # frozen batch norm: its statistics stay as loaded
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()
        return self


def architectures() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _check_arch(arch: str) -> None:
    names = architectures()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KdlError(
            f"model.arch: {arch!r} is not a torchvision classification model.{hint} "
            f"Choose one of: {', '.join(names)}"
        )


def preprocessing(cfg: TorchvisionConfig) -> Preprocessing | None:
    """The resize, crop and normalisation the pretrained weights were trained with (those of
    the arch's ImageNet weights, for a local state dict too); None without pretrained weights."""
    if cfg.pretrained == "none":
        return None
    import torchvision

    _check_arch(cfg.arch)
    weights = torchvision.models.get_model_weights(cfg.arch).DEFAULT
    transform = weights.transforms()
    return Preprocessing(resize=transform.resize_size[0], crop=transform.crop_size[0],
                         mean=tuple(transform.mean), std=tuple(transform.std))


def build(cfg: TorchvisionConfig, info: DataInfo) -> TorchvisionClassifier:
    import torchvision

    _check_arch(cfg.arch)
    if info.in_channels not in (1, 3):
        raise KdlError(f"model.name: torchvision models take RGB or gray images; the data has "
                       f"{info.in_channels} channels")
    options = {"aux_logits": False} if cfg.arch in AUX_HEADS else {}
    weights = torchvision.models.get_model_weights(cfg.arch).DEFAULT if cfg.pretrained == "imagenet" else None
    try:  # torch.hub says "Downloading: ..." on stdout, whose last line is the run id: stderr
        with contextlib.redirect_stdout(sys.stderr):
            net = torchvision.models.get_model(cfg.arch, weights=weights, **options)
    except (RuntimeError, OSError) as exc:  # the download: no network, a bad file
        raise KdlError(
            f"model.pretrained: imagenet: could not get torchvision's {cfg.arch} weights "
            f"({str(exc).strip().splitlines()[0]}). Check the network, or download them on another "
            f"machine and set model.pretrained to the saved state dict's path."
        ) from exc
    head_name = _head(net, cfg.arch)
    if cfg.pretrained not in ("none", "imagenet"):
        _load_local(net, Path(cfg.pretrained).expanduser(), head_name, cfg.arch)
    old = net.get_submodule(head_name)
    net.set_submodule(head_name, nn.Linear(old.in_features, info.num_classes))
    _freeze(net, cfg.freeze, head_name)
    return TorchvisionClassifier(net, head_name, info.in_channels, cfg.backbone_lr_scale)


def _head(net: nn.Module, arch: str) -> str:
    """The name of the model's last linear layer."""
    linear = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise KdlError(f"model.arch: {arch} has no linear classification head to replace "
                       "(its classifier is a convolution); choose another architecture")
    return linear[-1]


def _load_local(net: nn.Module, path: Path, head_name: str, arch: str) -> None:
    """A state dict of the same architecture; its head may be for other classes (it is
    replaced anyway), everything else must fit."""
    if not path.is_file():
        raise KdlError(f"model.pretrained: {str(path)!r} is not a file; give none, imagenet or "
                       f"the path of a state dict saved with torch.save({arch}.state_dict(), PATH)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle weights_only refuses, or not a torch file at all
        raise KdlError(f"model.pretrained: cannot read {path} as a state dict "
                       f"({str(exc).strip().splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise KdlError(f"model.pretrained: {path} holds a {type(state).__name__}, not a state dict")
    body = {k: v for k, v in state.items() if not k.startswith(f"{head_name}.")}
    try:
        missing, unexpected = net.load_state_dict(body, strict=False)
    except RuntimeError as exc:
        raise KdlError(f"model.pretrained: {path} does not fit {arch} "
                       f"({str(exc).strip().splitlines()[-1][:300]})") from None
    missing = [k for k in missing if not k.startswith(f"{head_name}.")]
    if missing or unexpected:
        raise KdlError(
            f"model.pretrained: {path} is not a state dict of {arch}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})"
        )


def _freeze(net: nn.Module, freeze: str, head_name: str) -> None:
    """requires_grad off for the backbone (all but the head) or up to a layer, inclusive."""
    if freeze == "none":
        return
    names = [name for name, _ in net.named_parameters()]
    if freeze == "backbone":
        frozen = [n for n in names if not n.startswith(f"{head_name}.")]
    else:
        layer = freeze.split(":", 1)[1]
        inside = [i for i, n in enumerate(names) if n.startswith(f"{layer}.")]
        if not inside:
            layers = ", ".join(name for name, _ in net.named_children())
            raise KdlError(f"model.freeze: {freeze!r}: the model has no layer {layer!r} with "
                           f"parameters; its layers are {layers} (or a dotted name inside one)")
        frozen = names[:inside[-1] + 1]
        if len(frozen) == len(names):
            raise KdlError(f"model.freeze: {freeze!r} freezes the whole model, head included: "
                           "name a layer before the head")
    parameters = dict(net.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
