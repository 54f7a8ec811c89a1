"""The seams every model family plugs into, proven with a toy family of two models and two
optimizers (tests/toytask.py) that runs through the unchanged CLI, engine and loop: exact resume,
per-model optimizers and lr multipliers, the non-finite policies over several losses, hooks;
plus task selection, metric directions and the config hash."""

from __future__ import annotations

import copy
import json
from typing import ClassVar, Literal

import pytest
import torch
import toytask
import yaml
from kdl import CONFIGS, kdl, train_tiny
from PIL import Image
from runfolders import make_run
from stopping import (
    STEPS_PER_EPOCH,
    assert_same_tensors,
    assert_same_training,
    final_state,
    metrics,
    read_json,
    stopped_and_resumed,
    train,
)

from karpathy_runner.build import build_experiment, build_trainer
from karpathy_runner.config import families, loading, root
from karpathy_runner.config.families import TaskConfig
from karpathy_runner.config.loading import load_config, resolve
from karpathy_runner.config.tasks import ClassifyConfig
from karpathy_runner.config.training import TrainConfig
from karpathy_runner.errors import ConfigError
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.ui.progress import Reporter

TOY = ["task.name=toy_pair",
       "optimizer={encoder: {name: adam, lr: 0.003}, head: {name: sgd, lr: 0.05, momentum: 0.9}}",
       "train.epochs=2"]


pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


@pytest.fixture
def toy():
    """The toy family, registered as an outside family registers (one call), for one test."""
    families.register(toytask.ToyPairConfig)
    yield
    families.unregister(toytask.ToyPairConfig)


def toy_train(runs, *overrides, resume=None):
    return train(runs, resume=resume) if resume else train(runs, *TOY, *overrides)


# ----------------------------------------------------------------------------- two models


def test_two_model_task_trains_checkpoints_and_resumes_bit_for_bit(toy, tmp_path, monkeypatch):
    straight = toy_train(tmp_path / "straight")
    assert straight.exit_code == 0, straight.stderr
    baseline = tmp_path / "straight" / straight.last_line

    folder = stopped_and_resumed(monkeypatch, toy_train, tmp_path / "stopped", [5, STEPS_PER_EPOCH + 2],
                                 toytask.ToyPair)
    assert_same_training(folder, baseline)
    for epoch in (1, 2):  # the epoch-end hook's pictures, identical too
        name = f"samples/epoch-{epoch:03d}.png"
        assert (folder / name).read_bytes() == (baseline / name).read_bytes()

    state = final_state(folder)
    assert set(state["models"]) == set(state["optimizers"]) == {"encoder", "head"}
    meta = read_json(folder / "meta.json")
    assert meta["task"] == "toy_pair"
    assert meta["metric_modes"] == {"loss": "min", "head_loss": "min", "accuracy": "max"}


def test_per_model_optimizers_lr_multipliers_and_every_lr_logged(toy, tmp_path):
    result = toy_train(tmp_path, "scheduler.name=cosine", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / result.last_line
    encoder, head = (final_state(folder)["optimizers"][name] for name in ("encoder", "head"))
    # each model its own optimizer, as the map says: Adam moments for one, SGD momentum for the other
    assert {"exp_avg", "exp_avg_sq"} <= set(encoder["state"][0])
    assert set(head["state"][0]) == {"momentum_buffer"}
    records = [r for r in metrics(folder) if r["split"] == "train"]
    assert all({"lr_encoder", "lr_head"} <= r.keys() and "lr" not in r for r in records)
    last = records[-1]
    assert last["lr_head"] / last["lr_encoder"] == pytest.approx(0.05 / 0.003)
    # each group's lr is the schedule's value times its multiplier: conv layers at 0.1x
    groups = encoder["param_groups"]
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert groups[0]["lr"] == pytest.approx(0.1 * last["lr_encoder"])
    assert groups[1]["lr"] == pytest.approx(last["lr_encoder"])
    assert head["param_groups"][0]["lr"] == pytest.approx(last["lr_head"])


def snapshot(models, optimizers):
    return {"models": {n: copy.deepcopy(m.state_dict()) for n, m in models.items()},
            "optimizers": {n: copy.deepcopy(o.state_dict()["state"]) for n, o in optimizers.items()}}


@pytest.mark.parametrize("phase", [1, 2])
def test_skip_step_skips_the_whole_step_of_every_model(toy, tmp_path, monkeypatch, phase):
    """A NaN in either phase leaves every weight, buffer and optimizer state as it was before the
    step: in phase 2 the head's update of phase 1 is undone, in phase 1 the encoder's batch-norm
    statistics that the NaN forward pass touched are restored."""
    poisoned, seen = 7, {}
    original = toytask.ToyPair.train_step

    def watched(self, batch, step, updater):
        if step + 1 in (poisoned, poisoned + 1):
            seen[step + 1] = snapshot(self.models, updater.optimizers)
        return original(self, batch, step, updater)

    monkeypatch.setattr(toytask.ToyPair, "train_step", watched)
    result = toy_train(tmp_path, "train.on_nonfinite=skip_step", f"task.poison_step={poisoned}",
                       f"task.poison_phase={phase}", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    assert_same_tensors(seen[poisoned], seen[poisoned + 1], "state around the skipped step")
    folder = tmp_path / result.last_line
    assert read_json(folder / "summary.json")["skipped_steps"] == 1
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics"))


def test_a_nonfinite_second_loss_stops_the_run_at_its_step(toy, tmp_path):
    result = toy_train(tmp_path, "task.poison_step=8", "task.poison_phase=2", "train.epochs=1")
    assert result.exit_code == 1
    assert "step 8, epoch 1" in result.stderr and "Traceback" not in result.stderr
    state = final_state(tmp_path / result.last_line)  # the step-4 checkpoint, finite
    assert state["loop"]["step"] == 4
    assert all(torch.isfinite(t).all() for m in state["models"].values() for t in m.values())


def test_every_loss_of_every_step_is_checked_and_summed():
    """The window reduction that logging and checkpoints use: per step, all losses finite."""
    from karpathy_runner.tasks import StepResult
    from karpathy_runner.tasks.steps import reduce_window

    def step(d_loss, g_loss, count=4):
        return StepResult(count, {"d_loss": torch.tensor(d_loss), "g_loss": torch.tensor(g_loss)},
                          {"correct": torch.tensor(1)})

    totals, finite = reduce_window([step(1.0, 2.0), step(0.5, float("nan")), step(float("inf"), 1.0)])
    assert finite == [True, False, False]
    totals, finite = reduce_window([step(1.0, 2.0), step(0.5, 1.0, count=2)])
    assert finite == [True, True]
    assert (totals.count, totals.losses, totals.sums) == (6.0, {"d_loss": 5.0, "g_loss": 10.0},
                                                          {"correct": 2.0})


def test_hooks_write_through_the_run_writer(toy, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = toy_train(tmp_path)
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / result.last_line
    # on_epoch_end: 8 filters of 3x3 in a 3-column grid with 2-pixel gaps, once per epoch
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["epoch-001.png", "epoch-002.png"]
    with Image.open(folder / "samples" / "epoch-002.png") as picture:
        assert picture.size == (3 * (3 + 2) + 2, 3 * (3 + 2) + 2)
    events = EventAccumulator(str(folder / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/examples", "samples/epoch"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/epoch")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]

    # sample: n images from a seed, the same bytes for the same seed
    out = [kdl("sample", folder.name, "-n", "4", "--seed", str(seed), "--out", tmp_path / f"s{i}.png",
               "--runs-dir", tmp_path) for i, seed in enumerate((3, 3, 4))]
    assert [r.exit_code for r in out] == [0, 0, 0], out[0].stderr
    assert out[0].last_line == str(tmp_path / "s0.png")
    first, again, other = ((tmp_path / f"s{i}.png").read_bytes() for i in range(3))
    assert first == again != other
    with Image.open(tmp_path / "s0.png") as picture:  # four 8x8 digits-shaped images, 2 columns
        assert picture.size == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2)
    default = kdl("sample", folder.name, "--runs-dir", tmp_path)
    assert default.last_line == str(folder / "samples" / "sample-best-seed0-n64.png")


def test_a_task_without_samples_says_so(trained):
    result = kdl("sample", trained.name, "--runs-dir", trained.parent)
    assert result.exit_code == 2
    assert "a classify run has nothing to sample" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- choosing the task


def test_the_task_defaults_from_model_and_data_and_is_written_in_the_config(toy, tmp_path):
    assert resolve({}).task.name == "classify"
    assert resolve({"task": {"label_smoothing": 0.1}}).task == ClassifyConfig(label_smoothing=0.1)
    toy_cfg = resolve({"task": {"name": "toy_pair"}})
    assert toy_cfg.train.best_metric == "val.loss"
    assert resolve({"task": {"name": "toy_pair"}, "train": {"best_metric": "val.head_loss"}})
    with pytest.raises(ConfigError, match="'val.head_loss' is not a metric of the classify task"):
        resolve({"train": {"best_metric": "val.head_loss"}})
    shown = kdl("validate", CONFIGS / "digits_cnn.yaml")
    assert "task: {name: classify, label_smoothing: 0.0, eval_flip: false}" in shown.stdout


class GanSpec(TaskConfig):  # the declarations of families to come, for the pure functions below
    TRAINS: ClassVar[dict] = {"image": ("gan",)}
    name: Literal["gan"] = "gan"


class LanguageModelSpec(TaskConfig):
    TRAINS: ClassVar[dict] = {"chars": ("rnn", "lstm", "gru")}
    name: Literal["language_model"] = "language_model"


class ClassifySpec(TaskConfig):
    TRAINS: ClassVar[dict] = {"image": ("cnn", "lstm"), "text": ("rnn", "lstm", "gru")}
    name: Literal["classify"] = "classify"


FAMILIES = (ClassifySpec, LanguageModelSpec, GanSpec)


def test_default_task_and_impossible_pairs_name_both_keys():
    assert families.default_task("gan", "image", FAMILIES) is GanSpec
    assert families.default_task("lstm", "chars", FAMILIES) is LanguageModelSpec
    assert families.default_task("cnn", "image", FAMILIES) is ClassifySpec
    assert families.default_task("cnn", "text", FAMILIES) is None
    assert families.task_problems(ClassifySpec, "cnn", "digits", "image", FAMILIES) == []
    # a gan task on a text corpus
    (problem,) = families.task_problems(GanSpec, "lstm", "imdb", "text", FAMILIES)
    assert problem.startswith("task.name: the gan task cannot train model.name 'lstm' on data.name "
                              "'imdb' (text data)") and "task.name: classify" in problem
    # a cnn on text: no task at all
    (problem,) = families.task_problems(ClassifySpec, "cnn", "imdb", "text", FAMILIES)
    assert problem.startswith("model.name: no task trains model.name 'cnn' on data.name 'imdb'")
    assert "model.name: rnn or lstm or gru" in problem


def test_a_model_family_from_outside_is_trained_by_the_task_it_names(tmp_path):
    """A new model for kdl's own classify task is its own files and one call: the task's
    declarations name no such model, the model's name the task."""
    families.register(toytask.ToyMLPConfig)
    try:
        assert resolve({"model": {"name": "toy_mlp"}}).task.name == "classify"
        with pytest.raises(ConfigError, match="no task trains model.name 'toy_mlp' on data.name "
                                              "'python_stdlib'"):
            resolve({"data": {"name": "python_stdlib"}, "model": {"name": "toy_mlp"}})
        config = tmp_path / "mlp.yaml"
        config.write_text(yaml.safe_dump({
            "name": "mlp", "data": {"name": "digits"}, "model": {"name": "toy_mlp", "hidden": 32},
            "optimizer": {"lr": 0.01}, "train": {"epochs": 3, "device": "cpu"}}))
        result = kdl("train", config, "--runs-dir", tmp_path, "--quiet")
        assert result.exit_code == 0, result.stderr
        summary = read_json(tmp_path / result.last_line / "summary.json")
        assert summary["final"]["val.accuracy"] > 0.8
    finally:
        families.unregister(toytask.ToyMLPConfig)


@pytest.mark.parametrize("override, fragments", [
    ("task.name=translate", ["task.name: unknown task 'translate'",
                             "Valid names: " + ", ".join(families.TASKS.names())]),
    ("task.name=gan", ["task.name: the gan task cannot train model.name 'cnn' on data.name 'digits'",
                       "use task.name: classify"]),
    ("task.label_smoothing=1.5", ["task.label_smoothing", "less than 1"]),
    ("train.early_stopping.metric=val.bogus",
     ["train.early_stopping.metric: 'val.bogus' is not a metric of the classify task"]),
    ("train.early_stopping.metric=bogus", ["train.early_stopping.metric", "val.loss or val.accuracy"]),
    ("optimizer={model: {lrr: 1}}", ["optimizer.model.lrr: unknown key", "'optimizer.model.lr'"]),
    ("optimizer={modle: {lr: 0.1}}",
     ["optimizer: a per-model map needs exactly the classify task's models (model), got modle",
      "Did you mean 'optimizer.model'"]),
])
def test_task_and_optimizer_mistakes_are_config_errors(override, fragments):
    result = kdl("validate", CONFIGS / "digits_cnn.yaml", "--set", override)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_an_optimizer_map_for_one_model_equals_the_single_branch():
    single = load_config(CONFIGS / "digits_cnn.yaml")
    mapped = load_config(CONFIGS / "digits_cnn.yaml",
                         ["optimizer={model: {name: adamw, lr: 0.015, weight_decay: 0.002}}"])
    assert mapped.optimizer_for("model") == single.optimizer_for("model") == single.optimizer


def test_label_smoothing_is_in_the_training_loss_not_the_eval_loss():
    """The classify task trains on smoothed targets and reports the plain cross-entropy in eval."""
    import contextlib

    import torch.nn.functional as F

    cfg = load_config(CONFIGS / "digits_cnn.yaml", ["task.label_smoothing=0.3", "train.device=cpu"])
    exp = build_experiment(cfg)
    batch = exp.prepare(exp.data.train.get_batch(torch.arange(16)), None)
    stepped = {}

    class Recorder:  # an updater that keeps the loss instead of stepping
        autocast = contextlib.nullcontext

        def step(self, name, loss):
            stepped[name] = loss.detach()

    exp.task.train(False)  # no dropout: the same logits in both steps
    with torch.no_grad():  # confident logits, where smoothing matters (at init they are uniform)
        exp.task.model.classifier[-1].weight.mul_(20)
    result = exp.task.train_step(batch, 0, Recorder())
    logits = exp.task.model(batch[0]).detach()
    smoothed = F.cross_entropy(logits, batch[1], label_smoothing=0.3)
    assert torch.equal(stepped["model"], result.losses["loss"])
    assert result.losses["loss"].item() == pytest.approx(smoothed.item(), rel=1e-6)
    plain = F.cross_entropy(logits, batch[1])
    assert abs(plain.item() - smoothed.item()) > 1e-3
    assert exp.task.eval_step(batch).losses["loss"].item() == pytest.approx(plain.item(), rel=1e-6)


# ----------------------------------------------------------------------------- metric directions


def test_early_stopping_has_its_own_direction(tmp_path):
    """best by val.accuracy (max) and early stopping on val.loss: a rising loss is no progress."""
    cfg = load_config(CONFIGS / "digits_cnn.yaml", [
        "train.best_metric=val.accuracy", "train.early_stopping.metric=val.loss",
        "train.early_stopping.patience=2", "train.device=cpu"])
    writer = RunWriter.create(tmp_path, cfg.name, cfg.to_yaml())
    trainer = build_trainer(build_experiment(cfg), writer, Reporter(quiet=True))
    assert (trainer.best_mode, trainer.stop_mode) == ("max", "min")
    for loss in (0.5, 0.6, 0.7):
        trainer._track_early_stopping({"val.loss": loss})
    assert trainer.state.stop_reason == "early_stopping" and trainer.state.stop_value == 0.5
    forced = load_config(CONFIGS / "digits_cnn.yaml", ["train.early_stopping.mode=max"])
    assert build_trainer(build_experiment(forced), writer, Reporter(quiet=True)).stop_mode == "max"
    writer.close()


def test_runs_sort_by_the_direction_the_task_declared(runs_dir):
    """Not by the metric's name: a task that declares accuracy 'min' gets it lowest first."""
    low = make_run(runs_dir, [0.9], metric_modes={"loss": "max", "accuracy": "min"})  # accuracy 0.55
    high = make_run(runs_dir, [0.2], metric_modes={"loss": "max", "accuracy": "min"})  # accuracy 0.9
    listed = json.loads(kdl("runs", "--sort", "val.accuracy", "--json").stdout)
    assert [r["id"] for r in listed] == [low.name, high.name]
    listed = json.loads(kdl("runs", "--sort", "val.loss", "--json").stdout)
    assert [r["id"] for r in listed] == [low.name, high.name]  # loss declared max: highest first
    undeclared = make_run(runs_dir / "old", [0.9], metric_modes={"other": "min"})
    make_run(runs_dir / "old", [0.2], metric_modes={"other": "min"})
    listed = json.loads(kdl("runs", "--runs-dir", runs_dir / "old", "--sort", "val.accuracy",
                            "--json").stdout)
    assert listed[0]["id"] == undeclared.name  # nobody says: ascending, like any other value


# ----------------------------------------------------------------------------- config hash


def test_config_hash_covers_values_that_differ_from_the_defaults():
    base = load_config(CONFIGS / "digits_cnn.yaml")
    assert load_config(CONFIGS / "digits_cnn.yaml", ["train.precision=fp32"]).hash() == base.hash()
    assert load_config(CONFIGS / "digits_cnn.yaml", ["task.name=classify"]).hash() == base.hash()
    assert load_config(CONFIGS / "digits_cnn.yaml", ["train.precision=bf16"]).hash() != base.hash()
    assert load_config(CONFIGS / "digits_cnn.yaml", ["seed=1"]).hash() != base.hash()
    # a family name is a value like any other: all-default configs of two datasets differ
    assert resolve({"data": {"name": "cifar10"}}).hash() != resolve({}).hash()
    lstm = resolve({"data": {"name": "python_stdlib"}, "model": {"name": "lstm"}})
    assert lstm.hash() != resolve({"data": {"name": "python_stdlib"}, "model": {"name": "gru"}}).hash()
    assert lstm.hash() != resolve({}).hash()  # every family at its own defaults: still another run
    # a family that needs a key (char_text's path) hashes too
    assert resolve({"data": {"name": "char_text", "path": "a.txt"}, "model": {"name": "lstm"}}).hash()


def test_a_chosen_task_counts_in_the_hash(toy):
    assert resolve({"task": {"name": "toy_pair"}}).hash() != resolve({}).hash()


def test_a_key_added_later_with_a_default_keeps_old_runs_for_skip_existing(tmp_path, monkeypatch):
    first = train_tiny(tmp_path, "--set", "train.epochs=1")
    assert first.exit_code == 0, first.stderr

    class NewerTrain(TrainConfig):
        ema_decay: float | None = None  # a key a later kdl adds, defaulted

    class NewerConfig(root.Config):
        train: NewerTrain = NewerTrain()

    monkeypatch.setattr(loading, "Config", NewerConfig)
    assert "ema_decay: null" in kdl("validate", CONFIGS / "digits_cnn.yaml").stdout
    again = train_tiny(tmp_path, "--set", "train.epochs=1", "--skip-existing", "--json")
    assert again.exit_code == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["skipped"] and report["id"] == first.last_line
    changed = train_tiny(tmp_path, "--set", "train.epochs=1", "--set", "train.ema_decay=0.99",
                         "--skip-existing", "--json")
    assert not json.loads(changed.stdout)["skipped"]
