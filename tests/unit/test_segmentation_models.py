"""Segmentation models: the U-Net at any image size; torchvision's models from the weights file in
the torch cache (written here in torch.save's format, as torch.hub leaves it), their heads made
anew for the data's classes, never a download."""

from __future__ import annotations

import pytest
import torch

from karpathy_runner.config.models import TorchvisionSegmentationConfig, UNetConfig
from karpathy_runner.data import DataInfo
from karpathy_runner.models import build_model
from karpathy_runner.models.segmentation import cached_file

INFO = DataInfo(kind="segmentation", num_classes=4, class_names=["a", "b", "c", "d"], in_channels=3,
                image_size=(32, 32))


@pytest.mark.parametrize("size", [(16, 16), (20, 13)])
def test_the_unet_gives_logits_at_the_input_size(size):
    model = build_model(UNetConfig(channels=[4, 8, 16]), INFO)
    assert model(torch.zeros(2, 3, *size)).shape == (2, 4, *size)


def test_full_weights_come_from_the_torch_cache_with_heads_for_the_datas_classes(tmp_path, monkeypatch,
                                                                                  capsys):
    import torchvision.models.segmentation as segmentation

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = TorchvisionSegmentationConfig(name="lraspp", backbone="mobilenet_v3_large", weights="full")
    published = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    path = cached_file(segmentation.LRASPP_MobileNet_V3_Large_Weights.DEFAULT)
    path.parent.mkdir(parents=True)
    torch.save(published.state_dict(), path)

    model = build_model(cfg, INFO)
    assert capsys.readouterr().err == ""  # cached: no note
    net = model.net
    assert (net.classifier.low_classifier.out_channels, net.classifier.high_classifier.out_channels) == (4, 4)
    loaded, saved = net.state_dict(), published.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if "_classifier." not in k)
    out = model.eval()(torch.zeros(1, 3, 32, 32))
    assert out["out"].shape == (1, 4, 32, 32) and "aux" not in out

    path.unlink()  # not cached, no download allowed: random weights, and a note that says so
    build_model(cfg, INFO)
    assert "not in the torch cache" in capsys.readouterr().err
    assert list(tmp_path.rglob("*.pth")) == []


def test_an_auxiliary_heads_loss_counts_aux_weight_times_and_ignored_pixels_never():
    from karpathy_runner.config.tasks import SegmentConfig
    from karpathy_runner.tasks.segment import Segment

    task = Segment(SegmentConfig(aux_weight=0.25), UNetConfig(channels=[4, 8]), INFO, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    out, aux = torch.randn(2, 2, 4, 3, 3, generator=generator)  # (B, classes, H, W) each
    masks = torch.randint(0, 4, (2, 3, 3), generator=generator)
    masks[0, 0] = 255
    task.models["model"] = lambda x: {"out": out, "aux": aux}
    losses = []

    class Updater:
        def autocast(self):
            return torch.autocast("cpu", enabled=False)

        def step(self, name, loss):
            losses.append(loss)

    result = task.train_step((torch.zeros(2, 3, 3, 3), masks), 0, Updater())
    ce = torch.nn.functional.cross_entropy
    expected = ce(out, masks, ignore_index=255) + 0.25 * ce(aux, masks, ignore_index=255)
    assert torch.allclose(losses[0], expected)
    assert float(result.sums["labelled"]) == 15  # 18 pixels, 3 ignored
