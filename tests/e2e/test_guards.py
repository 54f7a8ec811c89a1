"""Guards for behaviour that a one-line slip would silently lose: mixed precision in training and
eval, the flip augmentation, gradient clipping, best.pt only on improvement, and TensorBoard's
purge of redone steps on resume. Each test fails if its behaviour goes missing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from kdl import kdl, train_tiny
from stopping import final_state, metrics, only_run, signal_at, train

from karpathy_runner.build import eval_batches
from karpathy_runner.data.image_sets import ImagePrep, augment_batch
from karpathy_runner.evaluate import load_run
from karpathy_runner.runfolder.checkpoint import load_checkpoint
from karpathy_runner.tasks.base import evaluate
from karpathy_runner.updater import Updater, autocast_for

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


def records(folder: Path, split: str) -> list[dict]:
    return [r for r in metrics(folder) if r["split"] == split]


# ----------------------------------------------------------------------------- precision


def test_updater_autocast_is_bf16_on_cpu_and_fp32_is_plain():
    """Guards `autocast_for`: bf16 enters CPU autocast in bfloat16, fp32 enters none."""
    updater = Updater({}, [], "bf16", CPU, grad_clip=None, skip_nonfinite=False)
    assert not torch.is_autocast_enabled("cpu")
    with updater.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with autocast_for("fp32", CPU)():
        assert not torch.is_autocast_enabled("cpu")


def first_train_loss(runs: Path, precision: str) -> float:
    result = train_tiny(runs, "--set", f"train.precision={precision}", "--set", "train.max_steps=5",
                        "--set", "train.log_every_steps=5", "--set", "train.deterministic=true")
    assert result.exit_code == 0, result.stderr
    return records(runs / result.last_line, "train")[0]["loss"]


def test_bf16_training_really_runs_under_autocast(tmp_path):
    """Guards the classify step entering `updater.autocast()`: same seed, bf16 and fp32 log
    different losses, while two fp32 runs log the same one (the difference is not noise)."""
    fp32 = first_train_loss(tmp_path / "fp32", "fp32")
    assert first_train_loss(tmp_path / "fp32-again", "fp32") == fp32
    assert first_train_loss(tmp_path / "bf16", "bf16") != fp32


def test_eval_repeats_the_runs_bf16_numbers(tmp_path):
    """Guards `evaluate_run` evaluating under the run's precision: `kdl eval` of last.pt gives
    the val loss training logged for it; the same checkpoint in fp32 gives a clearly different
    one, so the check can tell the two apart."""
    result = train_tiny(tmp_path, "--set", "train.precision=bf16", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    logged = records(tmp_path / result.last_line, "val")[-1]["loss"]
    evaluated = kdl("eval", result.last_line, "--checkpoint", "last", "--split", "val", "--json",
                    "--runs-dir", tmp_path)
    assert evaluated.exit_code == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["precision"] == "bf16"
    assert report["metrics"]["loss"] == pytest.approx(logged, rel=1e-6)

    loaded = load_run(tmp_path, result.last_line, "last", "cpu")
    exp = loaded.exp
    fp32 = evaluate(exp.task, eval_batches(exp, exp.data.val), exp.prepare)["loss"]
    assert abs(fp32 - logged) > 20 * 1e-6 * abs(logged), (fp32, logged)


# ----------------------------------------------------------------------------- augmentation


def asymmetric_images(n: int = 64) -> torch.Tensor:
    """uint8 (n, 1, 4, 4): a bright left column, so a mirrored image is told apart."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, :, :, 0] = 255
    return images


def flipped_mask(out: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per image: True if mirrored, False if unchanged; anything else fails."""
    same = (out == original).flatten(1).all(1)
    mirrored = (out == original.flip(3)).flatten(1).all(1)
    assert bool((same ^ mirrored).all()), "an image is neither unchanged nor mirrored"
    return mirrored


def test_augment_batch_flips_some_images_and_not_others():
    """Guards the flip block of `augment_batch`."""
    x = asymmetric_images().float()
    flipped = flipped_mask(augment_batch(x, ("flip",), 0, torch.Generator().manual_seed(0)), x)
    assert 0 < int(flipped.sum()) < len(x)


def test_image_prep_flips_in_training_steps_only():
    """Guards `ImagePrep` applying the augmentation when given a step, and never in eval."""
    images = asymmetric_images()
    labels = torch.zeros(len(images), dtype=torch.int64)
    prep = ImagePrep(mean=(0.0,), std=(1.0,), augment=("flip",), padding=0, seed=0)
    plain = images.float() / 255
    for step in (0, 1):
        x, y = prep((images, labels), step)
        assert torch.equal(y, labels)
        flipped = flipped_mask(x, plain)
        assert 0 < int(flipped.sum()) < len(images), step
    x, _ = prep((images, labels), None)
    assert not flipped_mask(x, plain).any()


def test_image_prep_normalises_each_channel_and_pads_crops_with_black():
    """Guards `ImagePrep`'s one scale-and-shift: (x / 255 - mean) / std per channel, and the
    crop's padding is a black pixel (0 before normalising), whatever the channel's mean."""
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.4, 0.8)
    images = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6)
    channel = lambda values: torch.tensor(values).view(1, 3, 1, 1)  # noqa: E731
    expected = (images.float() / 255 - channel(mean)) / channel(std)
    x, y = ImagePrep(mean, std, augment=("crop",), padding=2, seed=0)((images, labels), None)
    assert x.dtype == torch.float32 and torch.equal(y, labels)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    # shifted by up to 2 pixels: some border pixel of some image came from the padding
    cropped, _ = ImagePrep(mean, std, augment=("crop",), padding=2, seed=0)((images, labels), 3)
    black = (-channel(mean) / channel(std)).expand_as(cropped)
    padded = torch.isclose(cropped, black, atol=1e-6).all(1)  # (B, H, W): all channels black
    assert padded[:, [0, -1], :].any() or padded[:, :, [0, -1]].any()
    assert not padded[:, 2, 2].any()  # the centre is always an image pixel (random, not black)


# ----------------------------------------------------------------------------- clipping


def test_updater_clips_the_gradient_norm():
    """Guards `clip_grad_norm_` in `Updater.step`: with SGD at lr 1 the update is the clipped
    gradient, of norm grad_clip; without clipping it is huge."""

    def update_norm(grad_clip: float | None) -> float:
        model = torch.nn.Linear(4, 1, bias=False)
        before = model.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
        updater = Updater({"model": optimizer}, [model], "fp32", CPU, grad_clip=grad_clip,
                          skip_nonfinite=False)
        updater.begin_step()
        updater.step("model", 1e6 * model(torch.ones(2, 4)).sum())
        updater.end_step()
        return float((model.weight.detach() - before).norm())

    assert update_norm(1.0) == pytest.approx(1.0, rel=1e-4)
    assert update_norm(None) > 1e5


# ----------------------------------------------------------------------------- best checkpoint


def test_best_checkpoint_is_written_only_on_improvement(tmp_path):
    """Guards `Trainer._end_epoch` saving best.pt only when the best metric improves: with a
    learning rate too small to change a weight, val loss is the same every epoch, so best.pt
    stays at epoch 1 while last.pt reaches epoch 3."""
    result = train_tiny(tmp_path, "--set", "train.epochs=3", "--set", "optimizer.lr=1e-12",
                        "--set", "model.batch_norm=false", "--set", "model.dropout=0")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / result.last_line
    val = [r["loss"] for r in records(folder, "val")]
    assert len(val) == 3 and len(set(val)) == 1, val  # never strictly better after epoch 1
    best_epoch = json.loads((folder / "summary.json").read_text())["best"]["epoch"]
    assert best_epoch == 1
    assert load_checkpoint(folder / "checkpoints" / "best.pt")["loop"]["epoch"] == best_epoch
    assert load_checkpoint(folder / "checkpoints" / "last.pt")["loop"]["epoch"] == 3


# ----------------------------------------------------------------------------- TensorBoard


def test_resume_purges_redone_steps_from_tensorboard(tmp_path, monkeypatch):
    """Guards the purge step `RunWriter.resume` gives TensorBoard: a run stopped at once in step
    10 logged step 9 after its step-8 checkpoint; resumed, TensorBoard shows every train step
    once, as metrics.jsonl does, though step 9 is on disk twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    signal_at(monkeypatch, [10], signal.SIGINT, times=2)
    stopped = train(tmp_path)
    assert stopped.exit_code == 130, stopped.stderr
    folder = only_run(tmp_path)
    assert final_state(folder)["loop"]["step"] == 8
    (event_file,) = (folder / "tb").iterdir()
    first = EventAccumulator(str(event_file))
    first.Reload()
    assert [e.step for e in first.Scalars("train/loss")] == [3, 6, 9]  # 9 is redone on resume

    # event files are named by the second they were opened in, and read in name order
    opened = int(event_file.name.split(".")[3])
    while int(time.time()) <= opened:
        time.sleep(0.05)
    resumed = train(tmp_path, resume=folder.name)
    assert resumed.exit_code == 0, resumed.stderr
    assert len(list((folder / "tb").iterdir())) == 2

    events = EventAccumulator(str(folder / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    train_records = records(folder, "train")
    assert [e.step for e in scalars] == [r["step"] for r in train_records]
    assert 9 in [e.step for e in scalars]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in train_records])
