"""Speed paths that must not change results: resident vs streamed data, the dataset cache,
channels-last and compiled models, fused optimizers."""

from __future__ import annotations

import dataclasses
import io
import pickle
import types

import pytest
import torch
import torchvision.datasets
from datafiles import write_cifar10, write_folder
from kdl import CONFIGS, train_tiny
from stopping import assert_same_tensors, final_state, read_json

from karpathy_runner.build import build_experiment, build_trainer, speed_up, streaming
from karpathy_runner.config.data import ImageDataConfig
from karpathy_runner.config.loading import load_config
from karpathy_runner.config.training import OptimizerConfig
from karpathy_runner.data import Batches, build_data, choose_placement
from karpathy_runner.optim import build_optimizer
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.ui.progress import Reporter

AUGMENTED = ["data.augment=[crop, flip]", "data.crop_padding=2", "train.device=cpu",
             "data.batch_size=64"]


def batches_of(tmp_path, placement: str, workers: int, epoch: int, start: int) -> list:
    """The prepared (augmented) training batches of one epoch, as the loop would step on them."""
    cfg = load_config(CONFIGS / "digits_cnn.yaml", [*AUGMENTED, f"data.placement={placement}",
                                                    f"data.num_workers={workers}"])
    exp = build_experiment(cfg)
    assert exp.data.placement == placement
    trainer = build_trainer(exp, RunWriter.create(tmp_path, placement, cfg.to_yaml()),
                            Reporter(quiet=True))
    batches = trainer.feed.train
    first_step = epoch * len(batches) + start
    return [exp.prepare(batch, first_step + i)
            for i, batch in enumerate(batches.epoch(epoch, start=start))]


@pytest.mark.parametrize("workers", [0, 2])
def test_resident_and_streamed_batches_are_identical(tmp_path, workers):
    """Same seed, same epoch: the same images in the same order with the same augmentation,
    whether cut from resident tensors or fetched by DataLoader workers into the loop."""
    resident = batches_of(tmp_path, "device", 0, epoch=1, start=3)
    streamed = batches_of(tmp_path, "stream", workers, epoch=1, start=3)
    assert len(resident) == len(streamed) == 21 - 3
    for (x, y), (x2, y2) in zip(resident, streamed, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(resident[0][1], batches_of(tmp_path, "device", 0, 2, 3)[0][1])


def test_placement_auto_keeps_small_data_resident_and_streams_folders():
    digits = build_experiment(load_config(CONFIGS / "digits_cnn.yaml", ["train.device=cpu"]))
    assert digits.data.placement == "device" and streaming(digits) == {}
    streamed = build_experiment(load_config(CONFIGS / "digits_cnn.yaml", [
        "train.device=cpu", "data.placement=stream", "data.num_workers=3"]))
    assert streaming(streamed) == {"stream": True, "num_workers": 3, "pin_memory": False}
    towards_a_gpu = dataclasses.replace(streamed, device=torch.device("cuda"))
    assert streaming(towards_a_gpu) == {"stream": True, "num_workers": 3, "pin_memory": True}


def test_streamed_batches_keep_their_workers_from_epoch_to_epoch():
    """One DataLoader, its workers started once, serves every epoch (each epoch's keys set on
    its sampler): no worker start-up at each epoch."""
    exp = build_experiment(load_config(CONFIGS / "digits_cnn.yaml", [
        "train.device=cpu", "data.placement=stream", "data.num_workers=2"]))
    batches = Batches(exp.data.train, 256, seed=0, shuffle=True, **streaming(exp))
    try:
        epochs = [[y for _, y in batches.epoch(epoch)] for epoch in range(2)]
        loader = batches._loader
        assert loader.persistent_workers and loader.num_workers == 2
        assert [len(e) for e in epochs] == [len(batches)] * 2
        assert not torch.equal(epochs[0][0], epochs[1][0])
        workers = loader._iterator._workers
        list(batches.epoch(2))
        assert loader._iterator._workers == workers and all(w.is_alive() for w in workers)
    finally:
        batches.close()
    assert not any(w.is_alive() for w in workers)


def test_placement_auto_streams_what_would_crowd_the_gpu(monkeypatch):
    """On CUDA, auto keeps the data resident only while it takes under a quarter of the free
    memory (faked here: this machine has no GPU)."""
    split = types.SimpleNamespace(nbytes=1000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8004, 16000))
    assert choose_placement("auto", [split, split], torch.device("cuda")) == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (7996, 16000))
    assert choose_placement("auto", [split, split], torch.device("cuda")) == "stream"
    assert choose_placement("device", [split, split], torch.device("cuda")) == "device"


def test_image_folder_on_the_device_is_decoded_once(tmp_path):
    write_folder(tmp_path, "train", per_class=4)
    cfg = load_config(CONFIGS / "digits_cnn.yaml", [
        "data.name=image_folder", f"data.root={tmp_path}", "data.image_size=8",
        "data.val_fraction=0.25", "train.device=cpu", "data.batch_size=2"])
    auto = build_experiment(cfg)
    assert auto.data.placement == "stream" and hasattr(auto.data.train, "paths")
    resident = build_experiment(cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"placement": "device"})}))
    assert resident.data.placement == "device" and resident.data.train.images.shape == (6, 3, 8, 8)
    index = torch.arange(6)
    assert torch.equal(resident.data.train.get_batch(index)[0], auto.data.train.get_batch(index)[0])


def test_streamed_run_trains_exactly_like_a_resident_one(tmp_path):
    """End to end: the placement changes where batches are cut, never what a run learns."""
    resident = train_tiny(tmp_path / "a", "--set", "data.placement=device",
                          "--set", "train.max_steps=25")
    streamed = train_tiny(tmp_path / "b", "--set", "data.placement=stream", "--set", "train.max_steps=25",
                          "--set", "data.num_workers=1")
    assert resident.exit_code == streamed.exit_code == 0, streamed.stderr
    a, b = tmp_path / "a" / resident.last_line, tmp_path / "b" / streamed.last_line
    assert_same_tensors(final_state(a)["models"], final_state(b)["models"])
    assert read_json(a / "summary.json")["final"] == read_json(b / "summary.json")["final"]


def torch_save_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_checkpoint_is_the_file_torch_save_writes_byte_for_byte(tmp_path):
    """A checkpoint is torch.save's own file: saving what it loads gives the same bytes."""
    result = train_tiny(tmp_path, "--set", "train.max_steps=8")
    assert result.exit_code == 0, result.stderr
    written = (tmp_path / result.last_line / "checkpoints" / "last.pt").read_bytes()
    assert written == torch_save_bytes(torch.load(io.BytesIO(written), weights_only=True))


def test_channels_last_flag_trains_a_conv_net(tmp_path):
    result = train_tiny(tmp_path, "--set", "train.channels_last=true", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / result.last_line
    assert read_json(folder / "summary.json")["final"]["val.accuracy"] > 0.5
    cfg = load_config(folder / "config.yaml")
    *_, conv = (m for m in build_experiment(cfg).task.model.modules()
                if isinstance(m, torch.nn.Conv2d))  # 8 -> 16 channels: the layouts differ
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()


@pytest.mark.parametrize("deterministic", [False, True])
def test_on_cuda_conv_nets_go_channels_last_and_cudnn_tunes_unless_deterministic(
        deterministic, monkeypatch):
    """The CUDA kernel settings, checked without a GPU (they read the device's type only):
    cuDNN's autotuner on unless the run is deterministic, conv nets channels-last by default."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", deterministic)  # the other way round
    conv = build_experiment(load_config(CONFIGS / "digits_cnn.yaml", [
        "train.device=cpu", f"train.deterministic={str(deterministic).lower()}"]))
    speed_up(conv.task, conv.cfg.train, torch.device("cuda"), compile_models=False)
    assert torch.backends.cudnn.benchmark is (not deterministic)
    *_, layer = (m for m in conv.task.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert not layer.weight.is_contiguous()
    kept = build_experiment(load_config(CONFIGS / "digits_cnn.yaml", [
        "train.device=cpu", "train.channels_last=false"]))
    speed_up(kept.task, kept.cfg.train, torch.device("cuda"), compile_models=False)
    *_, layer = (m for m in kept.task.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert layer.weight.is_contiguous()


def test_optimizers_use_fused_kernels_where_torch_has_them():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("sgd", "adam", "adamw"):
        assert build_optimizer(OptimizerConfig(name=name), params).defaults["fused"] is True
    assert not build_optimizer(OptimizerConfig(name="rmsprop"), params).defaults.get("fused")


def test_decoded_dataset_is_cached_and_rebuilt_when_its_sources_change(tmp_path, skip_md5,
                                                                      monkeypatch):
    """The first build decodes the files through torchvision and keeps the tensors under
    data.root; later builds read that file without torchvision, until a source file changes."""
    write_cifar10(tmp_path)
    cfg = ImageDataConfig(name="cifar10", root=str(tmp_path), download=False, val_fraction=0.0)
    first = build_data(cfg)
    cache = tmp_path / "kdl_cache" / "cifar10.pt"
    assert cache.is_file()

    decoded = []
    real = torchvision.datasets.CIFAR10
    monkeypatch.setattr(torchvision.datasets, "CIFAR10",
                        lambda *a, **k: decoded.append(k["train"]) or real(*a, **k))
    again = build_data(cfg)
    assert decoded == []  # from the cache
    assert torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.test.labels, first.test.labels)
    assert again.info.class_names == first.info.class_names

    batch_file = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch = pickle.loads(batch_file.read_bytes())
    batch["data"][0, 0] = 255 - batch["data"][0, 0]  # one pixel of the first image, same size
    batch_file.write_bytes(pickle.dumps(batch))
    changed = build_data(cfg)
    assert decoded == [True, False]  # both splits decoded again
    assert changed.train.images[0, 0, 0, 0] == 255 - first.train.images[0, 0, 0, 0]
    assert torch.equal(build_data(cfg).train.images, changed.train.images)
    assert decoded == [True, False]  # and the new cache serves the next build

    cache.write_bytes(cache.read_bytes()[:100])  # a cut cache file: decoded again, no error
    assert torch.equal(build_data(cfg).train.images, changed.train.images)
    assert decoded == [True, False, True, False]
