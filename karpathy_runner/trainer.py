"""The one training loop: epochs, precision, checkpoints and exact resume, signals, logging,
best checkpoint and early stopping. Tasks plug in their step; the loop never changes per task.

Per step the loop does no host-device sync, no file write and no progress redraw: step results
stay on the device in a small window that is reduced every `log_every_steps`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .config import TrainConfig, default_metric_mode
from .data import Batches
from .errors import RunFailed
from .optim import LRSchedule
from .progress import Reporter, format_metrics
from .runs import RunWriter
from .tasks import Task

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Updater:
    """Backward and optimizer step under the run's precision, scaling and clipping policy."""

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        precision: str,
        device: torch.device,
        grad_clip: float | None,
        skip_nonfinite: bool,
    ):
        self.optimizers = optimizers
        self.dtype = PRECISIONS[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.grad_clip = grad_clip
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        # skip_step must look at the loss before updating: the one policy that syncs every step
        if self.skip_nonfinite and not bool(torch.isfinite(loss.detach())):
            self.skipped_steps += 1
            return
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(optimizer)


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps done in the whole run
    best_value: float | None = None
    best_epoch: int | None = None
    stop_value: float | None = None  # best value of the early-stopping metric
    bad_epochs: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    stop_reason: str | None = None


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        task: Task,
        optimizers: dict[str, torch.optim.Optimizer],
        schedules: dict[str, LRSchedule],
        train_batches: Batches,
        val_batches: Batches | None,
        run: RunWriter,
        reporter: Reporter,
        device: torch.device,
    ):
        self.cfg = cfg
        self.task = task
        self.optimizers = optimizers
        self.schedules = schedules
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.run = run
        self.reporter = reporter
        self.device = device
        self.updater = Updater(
            optimizers, cfg.precision, device, cfg.grad_clip, cfg.on_nonfinite == "skip_step"
        )
        self.state = LoopState()
        self.window: list[dict[str, Any]] = []  # per-step results since the last log line
        self.best_mode = default_metric_mode(cfg.best_metric, cfg.best_mode)
        self.stop_metric = cfg.early_stopping.metric or cfg.best_metric
        self.stop_mode = default_metric_mode(self.stop_metric, cfg.best_mode)
        self.stop_signal: int | None = None
        self.started = time.time()
        self._window_started = time.perf_counter()
        self._window_samples = 0
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ the loop

    def fit(self) -> LoopState:
        cfg, state = self.cfg, self.state
        with self._signals():
            while state.epoch < cfg.epochs and state.stop_reason is None:
                if self.stop_signal is not None:  # came while the epoch ended: last.pt is current
                    state.stop_reason = "signal"
                    break
                self._train_epoch()
                if state.stop_reason == "signal":
                    break
                self._end_epoch()
        self.reporter.close()
        return state

    def _train_epoch(self) -> None:
        cfg, state = self.cfg, self.state
        total = len(self.train_batches)
        self.task.train(True)
        self.reporter.start_epoch(state.epoch, cfg.epochs, total, state.batch)
        for batch in self.train_batches.epoch(state.epoch, start=state.batch):
            # learning rate for this step
            for name, optimizer in self.optimizers.items():
                lr = self.schedules[name].lr(state.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            # forward, backward, update (the task's own step)
            result = self.task.train_step(batch, state.step, self.updater)
            self.updater.scaler.update()
            self.window.append(result)
            self._window_samples += int(result["count"])
            state.step += 1
            state.batch += 1
            # log, checkpoint, stop: each only at its interval
            if state.step % cfg.log_every_steps == 0:
                self._flush_window()
            elif self.reporter.live:
                self.reporter.advance(state.batch)
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                state.stop_reason = "max_steps"
                break
            if self.stop_signal is not None:
                state.stop_reason = "signal"
                self._save("last")
                return
            every = cfg.checkpoint_every_steps
            if every and state.step % every == 0 and state.batch < total:
                self._save("last")

    def _end_epoch(self) -> None:
        cfg, state = self.cfg, self.state
        self._flush_window()
        train = self._epoch_train_metrics()
        self.run.log_metrics(
            {"step": state.step, "epoch": state.epoch + 1, "split": "train_epoch", **train,
             "time": round(time.time() - self.started, 3)}
        )
        metrics = {f"train.{k}": v for k, v in train.items()}
        if self.val_batches is not None:
            val = evaluate(self.task, self.val_batches, self.updater.autocast)
            metrics.update({f"val.{k}": v for k, v in val.items()})
            self.run.log_metrics(
                {"step": state.step, "epoch": state.epoch + 1, "split": "val", **val,
                 "time": round(time.time() - self.started, 3)}
            )
        state.epoch += 1
        state.batch = 0
        state.epoch_sums = {}
        self.last_metrics = metrics
        improved = self._track_best(metrics)
        self._track_early_stopping(metrics)
        line = f"epoch {state.epoch}/{cfg.epochs}  {format_metrics(metrics)}"
        self.run.log(line)
        self.reporter.end_epoch(line)
        self._save(*(("last", "best") if improved else ("last",)))
        self.run.update_meta(
            epochs_done=state.epoch, step=state.step,
            best={"metric": cfg.best_metric, "value": state.best_value, "epoch": state.best_epoch},
        )

    # ------------------------------------------------------------------ metrics

    def _flush_window(self) -> None:
        """Reduce the window's step results on the host; the only sync in the train loop."""
        if self.updater.skip_nonfinite:
            # a skipped step changed no weights: keep its NaN out of the metrics (and the JSON) too
            finite = self._window_finite()
            self.window = [r for r, ok in zip(self.window, finite, strict=True) if ok]
        else:
            self._check_window_finite()
        if not self.window:
            return
        state = self.state
        sums = {}
        for key in self.window[0]:
            values = [r[key] for r in self.window]
            if isinstance(values[0], torch.Tensor):
                sums[key] = float(torch.stack([v.float() for v in values]).sum())
            else:
                sums[key] = float(sum(values))
        self.window = []
        for key, value in sums.items():
            state.epoch_sums[key] = state.epoch_sums.get(key, 0.0) + value
        metrics = self.task.summarize(sums)
        elapsed = time.perf_counter() - self._window_started
        samples_per_s = self._window_samples / elapsed if elapsed > 0 else 0.0
        lr = self.optimizers[next(iter(self.optimizers))].param_groups[0]["lr"]
        self.run.log_metrics(
            {"step": state.step, "epoch": state.epoch + 1, "split": "train", **metrics, "lr": lr,
             "samples_per_s": round(samples_per_s, 1), "time": round(time.time() - self.started, 3)}
        )
        self.reporter.update(state.batch, {**metrics, "samples/s": round(samples_per_s)})
        self._window_started = time.perf_counter()
        self._window_samples = 0

    def _epoch_train_metrics(self) -> dict[str, float]:
        if not self.state.epoch_sums:
            return {}
        return self.task.summarize(self.state.epoch_sums)

    def _nonfinite(self, step: int) -> None:
        epoch = self.state.epoch + 1
        self.run.flush()
        raise RunFailed(
            f"the loss became non-finite (NaN or inf) at step {step + 1}, epoch {epoch}. "
            "The checkpoints keep the last finite weights. Lower optimizer.lr, set train.grad_clip, "
            "or set train.on_nonfinite: skip_step to skip such steps."
        )

    def _track_best(self, metrics: dict[str, float]) -> bool:
        state = self.state
        value = metrics.get(self.cfg.best_metric)
        if value is None or not math.isfinite(value):
            return False
        if state.best_value is None or _better(value, state.best_value, self.best_mode, 0.0):
            state.best_value, state.best_epoch = value, state.epoch
            return True
        return False

    def _track_early_stopping(self, metrics: dict[str, float]) -> None:
        cfg, state = self.cfg.early_stopping, self.state
        value = metrics.get(self.stop_metric)
        if cfg.patience is None or value is None:
            return
        if state.stop_value is None or _better(value, state.stop_value, self.stop_mode, cfg.min_delta):
            state.stop_value, state.bad_epochs = value, 0
            return
        state.bad_epochs += 1
        if state.bad_epochs >= cfg.patience:
            state.stop_reason = "early_stopping"
            self.run.log(f"early stopping: {self.stop_metric} has not improved for "
                         f"{state.bad_epochs} epochs")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": {name: m.state_dict() for name, m in self.task.models.items()},
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "scheduler": {name: {"step": self.state.step} for name in self.schedules},
            "scaler": self.updater.scaler.state_dict(),
            "loop": {**asdict(self.state), "skipped_steps": self.updater.skipped_steps},
            "window": [{k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                        for k, v in r.items()} for r in self.window],
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, model in self.task.models.items():
            model.load_state_dict(state["models"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.updater.scaler.load_state_dict(state["scaler"])
        self.state = LoopState(**state["loop"])
        self.state.stop_reason = None
        self.updater.skipped_steps = self.state.skipped_steps
        self.window = [{k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                        for k, v in r.items()} for r in state["window"]]
        self._window_samples = sum(int(r["count"]) for r in self.window)
        set_rng_state(state["rng"])

    def _save(self, *which: str) -> None:
        """Flush metrics, then write the checkpoint(s); never with non-finite weights."""
        if not self.updater.skip_nonfinite:
            self._check_window_finite()
        if not all(bool(torch.isfinite(p).all()) for m in self.task.models.values()
                   for p in m.parameters()):
            self._nonfinite(self.state.step - 1)
        paths = [self.run.checkpoint(name) for name in which]
        try:
            self.run.flush()
            save_checkpoint(paths, self.state_dict())
        except OSError as exc:
            raise RunFailed(
                f"could not write {paths[-1]}: {exc.strerror or exc}. The previous checkpoint is "
                "intact; free some space (or fix the folder's permissions) and continue with "
                f"`kdl train --resume {self.run.id}`."
            ) from None

    def _window_finite(self) -> list[bool]:
        """Per step of the window, whether its loss was finite (one stack, one sync)."""
        if not self.window or not isinstance(self.window[0].get("loss"), torch.Tensor):
            return [True] * len(self.window)
        return torch.isfinite(torch.stack([r["loss"].float() for r in self.window])).tolist()

    def _check_window_finite(self) -> None:
        finite = self._window_finite()
        if not all(finite):
            self._nonfinite(self.state.step - len(self.window) + finite.index(False))

    # ------------------------------------------------------------------ signals

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """First SIGINT/SIGTERM: stop after this step with a checkpoint. Second SIGINT: now."""
        owner = os.getpid()

        def handler(signum: int, frame: Any) -> None:
            # a DataLoader worker forked with this handler, before it sets its own (data/__init__)
            if os.getpid() != owner:
                return
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.run.log(f"received {signal.Signals(signum).name}: stopping after this step")

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for s, old in previous.items():
                signal.signal(s, old)


def _better(value: float, best: float, mode: str, min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta


@torch.no_grad()
def evaluate(
    task: Task,
    batches: Batches,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    detailed: bool = False,
) -> dict[str, Any]:
    """Run the task's eval step over every batch and summarise on the host."""
    task.train(False)
    totals: dict[str, Any] = {}
    for batch in batches.epoch():
        with autocast():
            sums = task.eval_step(batch, detailed)
        for key, value in sums.items():
            totals[key] = totals[key] + value if key in totals else value
    host = {k: (v.cpu() if isinstance(v, torch.Tensor) and v.dim() else
                float(v)) for k, v in totals.items()}
    task.train(True)
    return task.summarize(host, detailed)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every random state a run touches, as plain values that load with weights_only=True."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(keys, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(np_keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys.tolist()), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
