"""From a validated config to what trains: the device, the data, the task (its models), the
optimizers and schedules, the batches, and the trainer that drives them. Everything that can fail
because of bad input (data, device, sizes) fails here, before a run folder is created or touched.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config.root import Config
from .config.training import DEVICE_PATTERN, TrainConfig
from .data import BatchDataset, Batches, DataBundle, DataInfo, Prepare, build_data, eval_batch_size
from .distributed import SINGLE, Ranks
from .errors import KdlError
from .loop import Feed, Optimization, Trainer
from .optim import LRSchedule, build_optimizer
from .rng import mixed_seed, seed_everything
from .runfolder.writer import RunWriter
from .tasks import Task, build_task
from .ui.progress import Reporter


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
    data = build_data(cfg.data, cfg.seed, vocabulary, cfg.model.preprocessing())
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
    if training and cfg.train.eval_every_steps and data.val is None:
        raise KdlError(
            f"train.eval_every_steps is {cfg.train.eval_every_steps} but there is no validation split "
            "(data.val_fraction is 0); set data.val_fraction > 0 or train.eval_every_steps: null"
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


def _check_fits_in_memory(cfg: Config, info: DataInfo, device: torch.device) -> None:
    """Sizes that validate but cannot be allocated (a layer of 10**10 units, a crop padding of
    10**5) are config errors naming their keys, before any folder exists, not allocator
    tracebacks. Models are built on the meta device to count their parameters: no memory, and
    the random state is left as it was."""
    memory = device_memory(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device("meta"):
        probe = build_task(cfg.task, cfg.model.shapes_only(), info, device)
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
    problem = cfg.data.memory_problem(info, memory)
    if problem:
        raise KdlError(problem)


def speed_up(task: Task, cfg: TrainConfig, device: torch.device, compile_models: bool) -> None:
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



def build_trainer(exp: Experiment, writer: RunWriter, reporter: Reporter,
                  ranks: Ranks = SINGLE) -> Trainer:
    """One optimizer and schedule per trainable model, the batches, handed to the one loop.
    Several processes each train the models through a DDP wrapper, which starts them from rank
    0's weights, each with its own random stream (dropout)."""
    cfg, task = exp.cfg, exp.task
    if ranks.rank:
        seed_everything(mixed_seed(cfg.seed, ranks.rank), cfg.train.deterministic)
    optimizers = {name: build_optimizer(cfg.optimizer_for(name), task.param_groups(name))
                  for name in task.trainable}
    # wrapped after the parameter groups are made: a family may find its batch norms by type
    # there (speedrun's), and SyncBatchNorm keeps their parameters
    task.wrap(lambda model: ranks.wrap(model, cfg.train.sync_batch_norm))
    train_batches = Batches(exp.data.train, cfg.data.batch_size, seed=cfg.seed,
                            shuffle=not task.ordered_batches, rank=ranks.rank, world=ranks.world,
                            **streaming(exp))
    total_steps = len(train_batches) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    schedules = {name: LRSchedule(cfg.scheduler, cfg.optimizer_for(name).lr, len(train_batches),
                                  total_steps) for name in optimizers}
    feed = Feed(train_batches, eval_batches(exp, exp.data.val), exp.prepare, exp.device)
    return Trainer(cfg.train, task, Optimization(optimizers, schedules), feed, writer, reporter, ranks)


@contextlib.contextmanager
def checkpoint_must_fit(path: Path) -> Iterator[None]:
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


def eval_batches(exp: Experiment, dataset: BatchDataset | None) -> Batches | None:
    if dataset is None:
        return None
    return Batches(dataset, eval_batch_size(exp.cfg.data), **streaming(exp))


def streaming(exp: Experiment) -> dict[str, Any]:
    """How batches reach the device: cut there (resident data), or through a DataLoader with
    the configured workers and, towards a GPU, pinned host memory."""
    if exp.data.placement == "device":
        return {}
    return {"stream": True, "num_workers": exp.cfg.data.loader_workers(),
            "pin_memory": exp.device.type == "cuda"}


