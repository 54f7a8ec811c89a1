"""What `kdl train`, `kdl eval` and `kdl sample` do, between the CLI and the trainer.

`kdl train` is planned first (a fresh run, a resume, or --skip-existing finding the work done),
then run. Everything that can fail because of bad input (config, data, device) is checked before
a run folder is created or touched, so a mistake leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed, runs
from .checkpoint import load_checkpoint
from .config import (
    DEVICE_PATTERN,
    SCHEMA_MAJOR,
    Config,
    load_config,
)
from .data import Batches, DataBundle, Prepare, build_data, eval_batch_size, mixed_seed
from .distributed import SINGLE, Ranks
from .dotted import flatten
from .errors import KdlError, RunFailed
from .models import model_preprocessing
from .optim import LRSchedule, build_optimizer
from .plan import Plan
from .progress import Reporter, format_duration
from .tasks import Sample, SampleRequest, Task, build_task
from .trackers import Setup
from .trainer import Stop, Trainer, autocast_for, evaluate, seed_everything
from .writer import RunWriter

EXIT_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class TrainResult:
    run_id: str
    folder: Path
    status: str
    exit_code: int
    summary: dict[str, Any]
    skipped: bool = False
    rank: int = 0  # of the process that returns it (only rank 0 reports to the user)


@dataclass
class Experiment:
    """Everything built from a config, before any file is written."""

    cfg: Config
    device: torch.device
    data: DataBundle
    task: Task
    prepare: Prepare  # the data's batch preparation, on `device`


MIN_VERSIONS = {"torch": (2, 6), "torchvision": (0, 21)}


def check_versions() -> None:
    """Refuse libraries whose weights_only loading is known to be unsafe (torch < 2.6)."""
    for name, needed in MIN_VERSIONS.items():
        version = package_version(name)
        found = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
        if found < needed:
            raise KdlError(
                f"{name} {version} is too old: kdl needs {name} >= {'.'.join(map(str, needed))} "
                "to load checkpoints safely. Upgrade with `pip install -U torch torchvision`."
            )


def package_version(name: str) -> str:
    """An installed package's version, without importing it (torchvision takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    if name == "torch":
        return torch.__version__
    try:
        return version(name)
    except PackageNotFoundError:
        return "0.0"


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The torch device `name` (the value of `key`: train.device, or eval's --device) means here."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise KdlError(f"{key}: must be one of auto, cpu, cuda, cuda:N, mps; got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            if torch.version.cuda:  # the right build: the GPU or its driver is what is missing
                fix = ("check that the machine has an NVIDIA GPU and driver (nvidia-smi) and that "
                       "CUDA_VISIBLE_DEVICES does not hide it")
            else:
                fix = "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
            raise KdlError(
                f"{key}: {name!r} asked for a CUDA GPU but torch sees none "
                f"(torch {torch.__version__}, built for "
                f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'the CPU only'}). "
                f"Use --device cpu or train.device: auto, or {fix}."
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise KdlError(
                f"{key}: {name!r} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise KdlError(f"{key}: 'mps' asked for Apple's GPU but it is not available here")
    return torch.device(name)


def build_experiment(cfg: Config, device_override: str | None = None, training: bool = True,
                     vocabulary: list[str] | None = None) -> Experiment:
    """Device, data and task from a validated config; every input error surfaces here.
    `vocabulary` is a run's saved one (text and character data), for resume, eval and sample."""
    check_versions()
    device = resolve_device(device_override or cfg.train.device,
                            "--device" if device_override else "train.device")
    if training and cfg.train.precision == "fp16" and device.type == "cpu":
        raise KdlError(
            "train.precision: fp16 needs a GPU; on the CPU use bf16 or fp32 (--set train.precision=bf16)"
        )
    seed_everything(cfg.seed, cfg.train.deterministic)
    data = build_data(cfg.data, cfg.seed, vocabulary, model_preprocessing(cfg.model))
    if training and cfg.data.batch_size > len(data.train):
        raise KdlError(
            f"data.batch_size is {cfg.data.batch_size} but the training set has only "
            f"{len(data.train)} samples; set data.batch_size to at most {len(data.train)}"
        )
    for key, metric in (("train.best_metric", cfg.train.best_metric),
                        ("train.early_stopping.metric", cfg.train.early_stopping.metric)):
        if training and metric and metric.startswith("val.") and data.val is None:
            raise KdlError(
                f"{key} is {metric!r} but there is no validation split (data.val_fraction is 0); "
                f"set data.val_fraction > 0 or {key}: train.{metric.split('.', 1)[1]}"
            )
    _check_fits_in_memory(cfg, data.info, device)
    task = build_task(cfg.task, cfg.model, data.info, device)
    task.to(device)
    speed_up(task, cfg.train, device, compile_models=training)
    return Experiment(cfg, device, data.to(device), task, data.prepare.to(device))


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device` (the host's RAM for the CPU)."""
    import os

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_fits_in_memory(cfg: Config, info: Any, device: torch.device) -> None:
    """Sizes that validate but cannot be allocated (a layer of 10**10 units, a crop padding of
    10**5) are config errors naming their keys, before any folder exists, not allocator
    tracebacks. Models are built on the meta device to count their parameters: no memory, and
    the random state is left as it was."""
    memory = device_memory(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    # the shapes only: pretrained weights are not read for it
    shapes = (cfg.model.model_copy(update={"pretrained": "none"}) if hasattr(cfg.model, "pretrained")
              else cfg.model)
    with torch.random.fork_rng(devices=cuda), torch.device("meta"):
        probe = build_task(cfg.task, shapes, info, device)
    parameters = sum(p.numel() for m in probe.models.values() for p in m.parameters())
    needed = parameters * 4 * 4  # fp32 weights, gradients and two optimizer moments
    if needed > memory:
        sizes = ", ".join(f"model.{key}={value}" for key, value in cfg.model.model_dump().items()
                          if isinstance(value, (int, list)) and not isinstance(value, bool))
        raise KdlError(
            f"the model has {parameters:,} parameters: with gradients and optimizer state about "
            f"{needed / 2**30:,.0f} GiB, more than the {memory / 2**30:,.0f} GiB of {device.type} "
            f"memory here. Make it smaller ({sizes})."
        )
    padding = getattr(cfg.data, "crop_padding", 0) if "crop" in getattr(cfg.data, "augment", ()) else 0
    if padding:
        height, width = info.image_size
        padded = cfg.data.batch_size * info.in_channels * (height + 2 * padding) * (width + 2 * padding)
        if padded * 4 * 3 > memory:  # the padded batch, its gather and its copy, in fp32
            raise KdlError(
                f"data.crop_padding: {padding} pads each batch of {cfg.data.batch_size} "
                f"{height}x{width} images to {height + 2 * padding}x{width + 2 * padding}, about "
                f"{padded * 12 / 2**30:,.0f} GiB, more than the {memory / 2**30:,.0f} GiB here; a "
                "padding of a few pixels (4 for 32x32 images) is usual."
            )


def speed_up(task: Task, cfg: Any, device: torch.device, compile_models: bool) -> None:
    """The `train` branch's kernel settings: cuDNN's autotuner (not under deterministic: it
    may pick other algorithms run to run), channels-last conv nets, torch.compile in place."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    for model in task.models.values():
        if channels_last and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
        if cfg.compile and compile_models:
            _check_compile()
            model.compile()


def _check_compile() -> None:
    import torch._dynamo  # only for train.compile: importing it takes a while

    if not torch._dynamo.is_dynamo_supported():
        raise KdlError(
            f"train.compile: true, but torch.compile does not support this platform (Python "
            f"{sys.version.split()[0]}, torch {torch.__version__}); set train.compile: false"
        )


def versions(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu_threads": torch.get_num_threads(),  # CPU results differ in the last bits with it
    }


# ----------------------------------------------------------------------------- running


def train(plan: Plan, runs_root: Path, command: list[str], quiet: bool = False) -> TrainResult:
    """`kdl train`: build what `plan` asks for, then start a fresh run or continue one. Started
    by torchrun, it first joins the other processes (every one has planned the same by then)."""
    ranks, device = distributed.start(plan.cfg.train.device)
    try:
        reporter = Reporter(quiet, ranks.rank)
        if plan.done is not None:
            reporter.message(f"run {plan.done.id} has this config and is {plan.done.status}: skipped")
            return TrainResult(plan.done.id, plan.done.path, plan.done.status, 0,
                               plan.done.summary(), skipped=True, rank=ranks.rank)
        if plan.cfg.data.batch_size < ranks.world:
            raise KdlError(
                f"data.batch_size is {plan.cfg.data.batch_size}, the global batch, but {ranks.world} "
                f"processes train: set data.batch_size to at least {ranks.world} (a multiple of it "
                "gives every process the same share)"
            )
        exp = build_experiment(plan.cfg, device, vocabulary=plan.run.vocabulary() if plan.run else None)
        stop = Stop()
        with stop.installed():  # before the folder exists: no moment of a run is unguarded
            if plan.run is None:
                result = start_run(exp, runs_root, command, reporter, plan.sweep, stop, ranks,
                                   plan.until_epoch)
            else:
                result = resume_run(exp, plan.run.path, plan.changes, command, reporter, stop, ranks,
                                    plan.until_epoch)
        if result.status != "failed":  # every rank is done with the others before they part
            ranks.barrier()
        return result
    finally:
        if plan.lock is not None:
            plan.lock.release()
        ranks.close()


def start_run(exp: Experiment, runs_root: Path, command: list[str], reporter: Reporter,
              sweep: dict[str, Any] | None = None, stop: Stop | None = None,
              ranks: Ranks = SINGLE, until_epoch: int | None = None) -> TrainResult:
    """A new run folder for a built experiment, trained to the end (or a stop, or the pause
    after epoch `until_epoch`)."""
    cfg = exp.cfg
    # rank 0 makes (and locks) the folder and tells the other ranks where it is
    made = RunWriter.create(runs_root, cfg.name, cfg.to_yaml()) if ranks.primary else None
    folder = ranks.share(made.folder if made else None)
    writer = made or RunWriter(folder, rank=ranks.rank)
    with writer.lock or contextlib.nullcontext():
        trainer = build_trainer(exp, writer, reporter, stop, ranks)
        trainer.until_epoch = until_epoch
        _start(exp, writer, command, sweep, ranks, until_epoch)
        reporter.message(f"run {writer.id}: {writer.folder}")
        return _drive(trainer, writer, previous_duration=0.0)


def _start(exp: Experiment, writer: RunWriter, command: list[str],
           sweep: dict[str, Any] | None, ranks: Ranks = SINGLE,
           until_epoch: int | None = None) -> None:
    cfg = exp.cfg
    processes = {"processes": ranks.world, "backend": ranks.backend} if ranks.world > 1 else {}
    writer.start({
        "name": cfg.name, "task": exp.task.name, "model": cfg.model.name,
        "dataset": cfg.data.name, "config_hash": cfg.hash(), "config_schema": SCHEMA_MAJOR,
        "device": str(exp.device),
        "epochs": cfg.train.epochs, "until_epoch": until_epoch, "metric_modes": exp.task.metrics,
        "versions": versions(exp.device), **({"sweep": sweep} if sweep else {}), **processes,
    }, command, _tracking(exp))
    if exp.data.info.vocabulary:
        writer.write_vocabulary(exp.data.info.vocabulary)
    writer.log(f"run {writer.id} started: {cfg.name} on {exp.device}")


def resume_run(exp: Experiment, folder: Path, changes: dict[str, Any], command: list[str],
               reporter: Reporter, stop: Stop | None = None, ranks: Ranks = SINGLE,
               until_epoch: int | None = None) -> TrainResult:
    """Continue the run in `folder` from its last checkpoint; a run killed before its first
    checkpoint starts again from step 0, as it did the first time."""
    writer = RunWriter(folder, rank=ranks.rank)
    trainer = build_trainer(exp, writer, reporter, stop, ranks)
    trainer.until_epoch = until_epoch
    last = writer.checkpoint("last")
    if last.is_file():
        checkpoint = load_checkpoint(last)
        with _checkpoint_must_fit(last):
            trainer.load_state_dict(checkpoint)
        trainer.restore_last_metrics(runs.read_jsonl(folder / runs.METRICS))
        writer.repair_best(trainer.state.epoch, trainer.state.best_epoch, trainer.state.batch)
    if exp.data.info.vocabulary and not (folder / runs.VOCAB).is_file():
        writer.write_vocabulary(exp.data.info.vocabulary)  # killed before it was written
    # the config is rewritten only now: a change the checkpoint cannot take leaves the run as it was
    rewrite = bool(changes) or "pending_config" in writer.meta
    writer.resume(trainer.state.step, command, changes, exp.cfg.to_yaml() if rewrite else None,
                  {"epochs": exp.cfg.train.epochs, "until_epoch": until_epoch,
                   "config_hash": exp.cfg.hash(), "config_schema": SCHEMA_MAJOR}, _tracking(exp))
    writer.log(f"===== resumed at epoch {trainer.state.epoch} step {trainer.state.step} =====")
    reporter.message(f"run {writer.id}: resumed {_position(trainer)}: {writer.folder}")
    return _drive(trainer, writer, previous_duration=float(writer.meta.get("duration_s") or 0.0))


def _tracking(exp: Experiment) -> Setup:
    """What the trackers get of the config: their own settings, the config flat (dotted names,
    as --set writes them), the metric tags to compare runs by."""
    cfg = exp.cfg
    return Setup(cfg.train.loggers, cfg.train.mlflow, cfg.train.wandb, cfg.name, flatten(cfg.to_dict()),
                 [f"{split}/{metric}" for split in ("val", "train_epoch") for metric in exp.task.metrics])


def build_trainer(exp: Experiment, writer: RunWriter, reporter: Reporter,
                  stop: Stop | None = None, ranks: Ranks = SINGLE) -> Trainer:
    """One optimizer and schedule per trainable model, the batches, handed to the one loop.
    Several processes start from rank 0's weights, each with its own random stream (dropout)."""
    cfg, task = exp.cfg, exp.task
    ranks.broadcast_models(list(task.models.values()))
    if ranks.rank:
        seed_everything(mixed_seed(cfg.seed, ranks.rank), cfg.train.deterministic)
    optimizers = {name: build_optimizer(cfg.optimizer_for(name), task.param_groups(name))
                  for name in task.trainable}
    train_batches = Batches(exp.data.train, cfg.data.batch_size, seed=cfg.seed,
                            shuffle=not task.ordered_batches, rank=ranks.rank, world=ranks.world,
                            **_streaming(exp))
    total_steps = len(train_batches) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    schedules = {name: LRSchedule(cfg.scheduler, cfg.optimizer_for(name).lr, len(train_batches),
                                  total_steps) for name in optimizers}
    trainer = Trainer(cfg.train, task, optimizers, schedules, exp.prepare, train_batches,
                      _eval_batches(exp, exp.data.val), writer, reporter, exp.device, stop, ranks)
    trainer.stop.attach(writer.log, trainer.reporter.notice)
    return trainer


def _drive(trainer: Trainer, writer: RunWriter, previous_duration: float) -> TrainResult:
    """Run the loop and leave the run folder in a final, truthful state whatever happens."""
    began = time.time()
    status, exit_code, error = "completed", 0, None
    try:
        state = trainer.fit()
        if state.stop_reason == "signal":
            status, exit_code = "interrupted", EXIT_SIGNALS.get(trainer.stop_signal, 130)
        elif state.stop_reason == "paused":
            status = "paused"
    except KeyboardInterrupt:
        status, exit_code = "interrupted", 130
    except RunFailed as exc:
        status, exit_code, error = "failed", 1, str(exc)
    except KdlError as exc:
        status, exit_code, error = "failed", exc.exit_code, str(exc)
    except Exception as exc:  # an unexpected failure: keep the traceback in train.log
        writer.log(traceback.format_exc())
        if writer.rank:  # which only rank 0 writes: another rank shows its own
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        status, exit_code, error = "failed", 1, f"{type(exc).__name__}: {exc}"
        if trainer.ranks.world > 1:
            error += " (Another training process may have stopped first: see its output.)"
    finally:
        trainer.reporter.close()
    duration = previous_duration + time.time() - began
    summary = _summary(trainer, status, duration)
    try:
        writer.finish(status, error, duration, summary)
        writer.close()
    except OSError as exc:  # e.g. the disk filled up: say so, keep the original error first
        status, exit_code = "failed", exit_code or 1
        error = (error + " " if error else "") + (
            f"The run folder {writer.folder} could not be updated ({exc.strerror or exc})."
        )
    if error:  # shown even with --quiet: a failed run must say why
        rank = f"rank {writer.rank}: " if writer.rank else ""
        print(f"error: {rank}{error}", file=sys.stderr, flush=True)
    elif status == "interrupted":  # also shown with --quiet: where it stopped, how to go on
        saved = ("with a checkpoint" if trainer.state.stop_reason == "signal"
                 else "at once: resume goes on from the last checkpoint")
        trainer.reporter.notice(f"interrupted {_position(trainer)}, {saved}; resume with "
                                f"`kdl train --resume {writer.id}`")
    elif status == "paused":
        trainer.reporter.notice(f"paused {_position(trainer)} at --until-epoch "
                                f"{trainer.until_epoch}; go on with `kdl train --resume {writer.id}`")
    else:
        _print_summary(trainer, writer.id, summary)
    return TrainResult(writer.id, writer.folder, status, exit_code, summary, rank=writer.rank)


def _position(trainer: Trainer) -> str:
    """'in epoch 3/10 at step 173' or 'after epoch 2/10 (step 120)': where the loop stands."""
    state, epochs = trainer.state, trainer.cfg.epochs
    if state.batch:
        return f"in epoch {state.epoch + 1}/{epochs} at step {state.step}"
    return f"after epoch {state.epoch}/{epochs} (step {state.step})"


def _print_summary(trainer: Trainer, run_id: str, summary: dict[str, Any]) -> None:
    """The last lines of a finished run: how long, the best epoch, and what to do next."""
    best = summary["best"]
    line = (f"done in {format_duration(summary['duration_s'])}: {summary['epochs_done']} epochs, "
            f"{summary['steps']} steps")
    if best["metric"] and best["value"] is not None:
        line += f"; best {best['metric']} {best['value']:.4g} at epoch {best['epoch']}"
    if summary["stop_reason"] not in (None, "signal", "paused"):
        line += f" (stopped early: {summary['stop_reason']})"
    trainer.reporter.message(line)
    trainer.reporter.message(f"test it:   kdl eval {run_id} --split test")
    trainer.reporter.message(f"inspect:   kdl show {run_id}")


def _summary(trainer: Trainer, status: str, duration: float) -> dict[str, Any]:
    state, cfg = trainer.state, trainer.cfg
    return {
        "status": status,
        "epochs_done": state.epoch,
        "steps": state.step,
        "stop_reason": state.stop_reason,
        "final": trainer.last_metrics,
        "best": {"metric": cfg.best_metric, "mode": trainer.best_mode,
                 "value": state.best_value, "epoch": state.best_epoch},
        "skipped_steps": state.skipped_steps,
        "duration_s": round(duration, 3),
    }


@contextlib.contextmanager
def _checkpoint_must_fit(path: Path) -> Iterator[None]:
    """Loading a checkpoint into models built from a config it was not trained with is a clear
    error (e.g. model.channels changed with --allow-changes), not a traceback."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise KdlError(
            f"checkpoint {path} does not fit the model built from the run's config.yaml "
            f"({str(exc).strip().splitlines()[0][:300]}). Keep the model.* keys the run was trained "
            "with; to train another model start a new run."
        ) from None


def _eval_batches(exp: Experiment, dataset: Any) -> Batches | None:
    if dataset is None:
        return None
    return Batches(dataset, eval_batch_size(exp.cfg.data), **_streaming(exp))


def _streaming(exp: Experiment) -> dict[str, Any]:
    """How batches reach the device: cut there (resident data), or through a DataLoader with
    the configured workers and, towards a GPU, pinned host memory."""
    if exp.data.placement == "device":
        return {}
    return {"stream": True, "num_workers": getattr(exp.cfg.data, "num_workers", 0),
            "pin_memory": exp.device.type == "cuda"}


# ----------------------------------------------------------------------------- eval and sample


@dataclass
class Loaded:
    """A finished or running run rebuilt from its config.yaml, with a checkpoint's weights."""

    run: runs.Run
    exp: Experiment
    checkpoint: str
    state: dict[str, Any]


def load_run(runs_root: Path, ref: str, checkpoint: str, device: str) -> Loaded:
    check_versions()  # before anything is unpickled
    resolve_device(device, "--device")  # a bad --device is said first
    run = runs.resolve_run(runs_root, ref)
    runs.refuse_damaged(run)
    cfg = load_config(run.path / runs.CONFIG)
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
    with _checkpoint_must_fit(path):
        for name, model in exp.task.models.items():
            model.load_state_dict(state["models"][name])
    return Loaded(run, exp, checkpoint, state)


def eval_precision(precision: str, device: torch.device) -> str:
    """The run's precision, so eval repeats training's numbers; fp16 has no CPU path: fp32."""
    return "fp32" if precision == "fp16" and device.type == "cpu" else precision


def evaluate_run(
    runs_root: Path, ref: str, checkpoint: str = "best", split: str = "val", device: str = "auto",
    features: str | None = None,
) -> tuple[runs.Run, dict[str, Any]]:
    """Rebuild data and model from the run's config.yaml, load a checkpoint, evaluate a split
    under the run's precision. A task that draws images (a GAN) also has its samples scored
    against the split's images in a classifier's feature space: the run `features`, else
    Inception-v3 if its weights are in the torch cache."""
    loaded = load_run(runs_root, ref, checkpoint, device)
    exp, cfg = loaded.exp, loaded.exp.cfg
    dataset = getattr(exp.data, split)
    if dataset is None:
        raise KdlError(f"the {cfg.data.name} data of run {loaded.run.id} has no {split} split: "
                       f"{_missing_split(cfg, split)}")
    precision = eval_precision(cfg.train.precision, exp.device)
    autocast = autocast_for(precision, exp.device)
    batches = _eval_batches(exp, dataset)
    metrics = evaluate(exp.task, batches, exp.prepare, autocast, detailed=True)
    if getattr(exp.task, "draws_images", False):
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
        "evaluated_at": runs.utc_now(),
        "metrics": metrics,
    }
    RunWriter(loaded.run.path).write_eval(result)
    return loaded.run, result


def _missing_split(cfg: Config, split: str) -> str:
    """Where the split was looked for, and how to get one."""
    root = getattr(cfg.data, "root", None)
    if cfg.data.name == "image_folder":
        folder = Path(root).expanduser().resolve() / split
        hint = f"there is no {folder} (<class>/<image> inside)"
        return hint + ("; or set data.val_fraction > 0" if split == "val" else "")
    if split == "val":
        return "data.val_fraction is 0; train a run with data.val_fraction > 0 to have one"
    return f"this dataset has no {split} split in {root}" if root else f"this dataset has no {split} split"


def _sample_quality(runs_root: Path, features: str | None, exp: Experiment, batches: Batches,
                    autocast: Any) -> dict[str, Any]:
    """Frechet distance, classifier score and class coverage of as many samples as the split
    has images, each batch of samples from its own seed (0, 1, ...)."""
    from .quality import RunFeatures, image_quality, inception_features

    if features is None:
        extractor, per_class = inception_features(exp.device), False
    else:
        classifier = load_run(runs_root, features, "best", str(exp.device))
        _check_classifier(classifier, exp)
        extractor = RunFeatures(classifier.run.id, classifier.exp.task.model, classifier.exp.prepare,
                                classifier.exp.data.info.num_classes)
        per_class = True
    seeds = iter(range(len(batches)))

    def generate(n: int) -> Any:
        with autocast():
            return exp.task.sample(SampleRequest(n=n, seed=next(seeds))).images

    real = (batch[0] for batch in batches.epoch())
    return {**image_quality(real, generate, extractor, per_class), "features": extractor.description}


def _check_classifier(classifier: Loaded, exp: Experiment) -> None:
    """--features must be a classification run on the same images."""
    info, theirs = exp.data.info, classifier.exp.data.info
    same = (classifier.exp.task.name == "classify" and theirs.kind == "image"
            and (theirs.in_channels, theirs.image_size, theirs.class_names)
            == (info.in_channels, info.image_size, info.class_names))
    if not same:
        raise KdlError(
            f"--features {classifier.run.id}: the features must come from a classification run "
            f"of a cnn on the same images ({exp.cfg.data.name}: {info.in_channels}x"
            f"{info.image_size[0]}x{info.image_size[1]}, {len(info.class_names)} classes); it is a "
            f"{classifier.exp.task.name} run on {classifier.exp.cfg.data.name}. Train one, e.g. "
            f"kdl train configs/{exp.cfg.data.name}_cnn.yaml, and pass its id."
        )


def sample_run(runs_root: Path, ref: str, request: SampleRequest, checkpoint: str = "best",
               out: Path | None = None, device: str = "auto") -> tuple[Sample, Path | None]:
    """`kdl sample`: draw from a run's checkpoint. Images are written (to `out`, else the run's
    samples/ folder), text only when `out` is given; returns the sample and the file written."""
    loaded = load_run(runs_root, ref, checkpoint, device)
    task = loaded.exp.task
    task.train(False)
    with torch.no_grad(), autocast_for(eval_precision(loaded.exp.cfg.train.precision,
                                                      loaded.exp.device), loaded.exp.device)():
        sample = task.sample(request)
    if sample.images is None and out is None:
        return sample, None
    name = f"sample-{checkpoint}-seed{request.seed}-n{request.n}"
    return sample, RunWriter(loaded.run.path).write_sample(name, sample, path=out)
