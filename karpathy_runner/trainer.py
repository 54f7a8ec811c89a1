"""The one training loop: epochs, precision, checkpoints and exact resume, signals, logging,
best checkpoint and early stopping. Tasks plug in their step; the loop never changes per task.

Per step the loop does no host-device sync, no file write and no progress redraw: step results
stay on the device in a small window that is reduced every `log_every_steps`.
"""

from __future__ import annotations

import contextlib
import copy
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

from .config import TrainConfig
from .data import Batches, Prepare
from .distributed import SINGLE, Ranks
from .errors import KdlError, RunFailed
from .optim import LRSchedule
from .progress import Reporter, format_metrics
from .tasks import StepResult, Task, Totals
from .writer import RunWriter

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for a precision (fp32: none), for training and eval."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class Updater:
    """Backward and optimizer step under the run's precision, scaling, clipping and non-finite
    policy. With `skip_nonfinite`, a non-finite loss skips the whole step: no later update in it
    runs, and updates already made in it (a GAN's discriminator) are undone, weights, optimizer
    state and buffers (batch-norm statistics the bad forward pass touched) alike."""

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        models: list[torch.nn.Module],
        precision: str,
        device: torch.device,
        grad_clip: float | None,
        skip_nonfinite: bool,
        ranks: Ranks = SINGLE,
    ):
        self.optimizers = optimizers
        self.models = models
        self.autocast = autocast_for(precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.grad_clip = grad_clip
        self.skip_nonfinite = skip_nonfinite
        self.ranks = ranks
        self.loss_scale = 1.0  # this rank's share of the global batch (distributed.loss_scale)
        self.skipped = False  # the step in flight met a non-finite loss
        self._stepped = False  # some optimizer stepped in the step in flight
        self._undo: list[Callable[[], None]] = []

    def begin_step(self) -> None:
        self.skipped, self._stepped, self._undo = False, False, []
        if self.skip_nonfinite:
            self._undo.append(_restorer([b for m in self.models for b in m.buffers()]))

    def step(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        if self.skipped:
            return
        # skip_step must look at the loss before updating: the one policy that syncs every step;
        # every rank skips if one must, so that none waits alone in the gradient all-reduce
        if self.skip_nonfinite and not self.ranks.all_true(bool(torch.isfinite(loss.detach()))):
            self.skipped = True  # undone at end_step, after whatever the task still runs
            return
        # backward (then the gradients averaged over the ranks, if several)
        self.scaler.scale(loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.ranks.average_gradients(params)
        # clip
        if self.grad_clip is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        # step (remembering what it changes, if a later loss of this step could undo it)
        if self.skip_nonfinite and len(self.optimizers) > 1:
            self._undo.append(_restorer(params, optimizer))
        self.scaler.step(optimizer)
        self._stepped = True

    def end_step(self) -> None:
        """Undo a skipped step; the scaler adapts once per step, after all its optimizers (and
        only if one stepped: it has nothing to adapt to otherwise)."""
        if self.skipped:
            for undo in reversed(self._undo):
                undo()
        self.ranks.average_buffers(self.models)
        if self._stepped:
            self.scaler.update()


def _restorer(tensors: list[torch.Tensor], optimizer: torch.optim.Optimizer | None = None
              ) -> Callable[[], None]:
    """A function that puts `tensors` (and the optimizer's state) back as they are now."""
    saved = [t.detach().clone() for t in tensors]
    state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None

    def restore() -> None:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
        if optimizer is not None:
            optimizer.load_state_dict(state)

    return restore


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
    epoch_sums: dict[str, Any] = field(default_factory=dict)  # this epoch's totals so far
    skipped_steps: int = 0
    stop_reason: str | None = None


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        task: Task,
        optimizers: dict[str, torch.optim.Optimizer],
        schedules: dict[str, LRSchedule],
        prepare: Prepare,
        train_batches: Batches,
        val_batches: Batches | None,
        run: RunWriter,
        reporter: Reporter,
        device: torch.device,
        stop: Stop | None = None,
        ranks: Ranks = SINGLE,
    ):
        self.cfg = cfg
        self.task = task
        self.optimizers = optimizers
        self.schedules = schedules
        self.prepare = prepare
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.run = run
        self.reporter = reporter
        self.device = device
        self.ranks = ranks
        self.updater = Updater(optimizers, list(task.models.values()), cfg.precision, device,
                               cfg.grad_clip, cfg.on_nonfinite == "skip_step", ranks)
        self.state = LoopState()
        self.resumed = False
        self.window: list[StepResult] = []  # per-step results since the last log line
        # no best metric (a GAN's): best.pt is the latest epoch's
        self.best_mode = self.mode(cfg.best_metric, cfg.best_mode) if cfg.best_metric else None
        self.stop_metric = cfg.early_stopping.metric or cfg.best_metric
        self.stop_mode = self.mode(self.stop_metric, cfg.early_stopping.mode) if self.stop_metric else None
        self.stop = stop or Stop()
        self.stop.world = ranks.world
        self.started = time.time()
        self._window_started = time.perf_counter()
        self._window_samples = 0
        self._compiling = cfg.compile
        self.last_metrics: dict[str, float] = {}
        # pause (stop_reason "paused") once this many epochs are done: a search's rung budget
        self.until_epoch: int | None = None

    @property
    def stop_signal(self) -> int | None:
        return self.stop.signum

    def mode(self, metric: str, configured: str) -> str:
        """min or max: as configured, or (auto) the direction the task declares for the metric."""
        return configured if configured != "auto" else self.task.metrics[metric.split(".", 1)[1]]

    # ------------------------------------------------------------------ the loop

    def fit(self) -> LoopState:
        state = self.state
        with self.stop.installed():
            if not self.resumed:
                self._log_examples()
            self.stop.in_loop = True
            try:
                self._epochs()
            finally:
                self.stop.in_loop = False
                self.run.wait_for_checkpoint()  # on disk before the run's end is written
        self.reporter.close()
        return state

    def _epochs(self) -> None:
        cfg, state = self.cfg, self.state
        self._window_started = time.perf_counter()
        while state.epoch < cfg.epochs and state.stop_reason is None:
            if self.until_epoch is not None and state.epoch >= self.until_epoch:
                state.stop_reason = "paused"  # after the epoch's checkpoint, as a straight run's
                break
            if self._stopping():  # before a step of this process: save where it is
                state.stop_reason = "signal"
                if not self.run.checkpoint("last").is_file():
                    self._save("last")  # stopped in the start-up: resumable from step 0
                break
            self._train_epoch()
            if state.stop_reason == "signal":
                break
            self._end_epoch()

    def _train_epoch(self) -> None:
        cfg, state = self.cfg, self.state
        total = len(self.train_batches)
        self.task.train(True)
        self.reporter.start_epoch(state.epoch, cfg.epochs, total, state.batch,
                                  min(total * cfg.epochs, cfg.max_steps or total * cfg.epochs))
        if state.batch == 0:  # (a run resumed mid-epoch keeps the task's state from its checkpoint)
            self.task.on_epoch_start(state.epoch)
        for batch in self.train_batches.epoch(state.epoch, start=state.batch):
            # learning rate for this step: the schedule's value times each group's multiplier
            self._set_lr(state.step)
            # forward, backward, update: the task's own step, through the updater
            self.updater.begin_step()
            if self.ranks.world > 1:  # (one process: always 1)
                self.updater.loss_scale = self.ranks.loss_scale(self._batch_items(state.batch))
            prepared = self.prepare(batch, self.ranks.draw(state.step))
            result = self.task.train_step(prepared, state.step, self.updater)
            self.updater.end_step()
            if self.updater.skipped:  # changed nothing: no metrics either
                state.skipped_steps += 1
            else:
                self.window.append(result)
                self._window_samples += result.count
            if self._compiling:  # this first step compiled the models: timed apart
                self._log_compile_time()
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
            if self._stopping():
                state.stop_reason = "signal"
                self._save("last")
                return
            every = cfg.checkpoint_every_steps
            if every and state.step % every == 0 and state.batch < total:
                self._save("last")

    def _log_compile_time(self) -> None:
        """torch.compile works at the first forward and backward: that step's time goes into
        train.log and meta.json (compile_s), and the samples/s of the first window leave it out."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._window_started
        self.run.log(f"torch.compile: the first step (compiling) took {seconds:.1f} s")
        self.run.update_meta(compile_s=round(seconds, 3))
        self._compiling = False
        self._window_started, self._window_samples = time.perf_counter(), 0

    def _stopping(self) -> bool:
        """Whether a stop signal came, to this rank or (agreed every step) to any other: all
        ranks stop after the same step."""
        if self.ranks.world == 1:
            return self.stop.signum is not None
        # a signal that lands while the ranks compare is kept for the next step's comparison
        # (never overwritten by this one's answer): every rank stops after the same step
        agreed = self.ranks.largest(self.stop.signum or 0)
        if agreed and self.stop.signum is None:
            self.stop.signum = agreed
        return bool(agreed)

    def _batch_items(self, index: int) -> int:
        """How many items global batch `index` of an epoch holds (the last may be short)."""
        size = self.train_batches.batch_size
        return min(size, len(self.train_batches.dataset) - index * size)

    def _set_lr(self, step: int) -> None:
        for name, optimizer in self.optimizers.items():
            lr = self.schedules[name].lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def _end_epoch(self) -> None:
        cfg, state = self.cfg, self.state
        self._flush_window()
        train = self.task.summarize(_totals(state.epoch_sums)) if state.epoch_sums else {}
        self.run.log_metrics(
            {"step": state.step, "epoch": state.epoch + 1, "split": "train_epoch", **train,
             "time": round(time.time() - self.started, 3)}
        )
        metrics = {f"train.{k}": v for k, v in train.items()}
        if self.val_batches is not None:
            val = evaluate(self.task, self.val_batches, self.prepare, self.updater.autocast)
            metrics.update({f"val.{k}": v for k, v in val.items()})
            self.run.log_metrics(
                {"step": state.step, "epoch": state.epoch + 1, "split": "val", **val,
                 "time": round(time.time() - self.started, 3)}
            )
        state.epoch += 1
        state.batch = 0
        state.epoch_sums = {}
        self.last_metrics = metrics
        sample = self.task.on_epoch_end(state.epoch)  # the task's hook: samples to keep
        if sample is not None:
            self.run.write_sample(f"epoch-{state.epoch:03d}", sample, state.step)
        improved = self._track_best(metrics)
        self._track_early_stopping(metrics)
        line = f"epoch {state.epoch}/{cfg.epochs}  {format_metrics(metrics)}"
        self.run.log(line)
        self.reporter.end_epoch(line)
        # best.pt before last.pt: a kill between them leaves last.pt at the epoch before, which a
        # resume trains again to the same best.pt; the other order leaves best.pt behind for good.
        # meta.json's epochs_done after both: it never claims an epoch no checkpoint holds
        self._save(*(("best", "last") if improved else ("last",)), meta={
            "epochs_done": state.epoch, "step": state.step,
            "best": {"metric": cfg.best_metric, "mode": self.best_mode, "value": state.best_value,
                     "epoch": state.best_epoch}})

    def restore_last_metrics(self, records: list[dict[str, Any]]) -> None:
        """The metrics of the last completed epoch, as _end_epoch made them, from metrics.jsonl:
        a run resumed after its last epoch (killed before its final writes) still reports them."""
        splits = {"train_epoch": "train", "val": "val"}
        self.last_metrics = {
            f"{splits[r['split']]}.{k}": v for r in records
            if r.get("epoch") == self.state.epoch and r.get("split") in splits
            for k, v in r.items() if k not in ("step", "epoch", "split", "time")
        }

    def _log_examples(self) -> None:
        """The task's view of the first training items, into TensorBoard."""
        dataset = self.train_batches.dataset
        sample = self.task.example_inputs(dataset.get_batch(torch.arange(min(32, len(dataset)))))
        if sample is not None:
            self.run.tensorboard("train/examples", sample)

    # ------------------------------------------------------------------ metrics

    def _flush_window(self) -> None:
        """Reduce the window's step results on the host; the only sync in the train loop."""
        if not self.window:
            return
        state = self.state
        totals, finite = _reduce(self.window, self.ranks.sum)
        self._check_finite(finite)
        self.window = []
        state.epoch_sums = _add(state.epoch_sums, totals)
        metrics = self.task.summarize(totals)
        elapsed = time.perf_counter() - self._window_started
        samples_per_s = totals.count / elapsed if elapsed > 0 else 0.0
        self.run.log_metrics(
            {"step": state.step, "epoch": state.epoch + 1, "split": "train", **metrics,
             **self._lrs(state.step - 1), "samples_per_s": round(samples_per_s, 1),
             "time": round(time.time() - self.started, 3)}
        )
        self.reporter.update(state.batch, {**metrics, "samples/s": round(samples_per_s)})
        self._window_started = time.perf_counter()

    def _lrs(self, step: int) -> dict[str, float]:
        """Every optimizer's scheduled lr at `step`: `lr`, or `lr_<model>` for several."""
        if len(self.schedules) == 1:
            return {"lr": next(iter(self.schedules.values())).lr(step)}
        return {f"lr_{name}": schedule.lr(step) for name, schedule in self.schedules.items()}

    def _check_finite(self, finite: list[bool]) -> None:
        """Fail the run at the window's first step with a non-finite loss, if any."""
        if not all(finite):
            self._nonfinite(self.state.step - len(self.window) + finite.index(False))

    def _nonfinite(self, step: int, what: str = "the loss") -> None:
        # the epoch of the steps checked, all in the latest one done: the current one, or at an
        # epoch's end (position 0 of the next) the one just counted (not steps / batches per
        # epoch, which a resume with another batch size changes)
        epoch = self.state.epoch + (1 if self.state.batch else 0)
        self.run.flush()
        raise RunFailed(
            f"{what} became non-finite (NaN or inf) at step {step + 1}, epoch {epoch}. "
            "The checkpoints keep the last finite weights. Lower optimizer.lr, set train.grad_clip, "
            "or set train.on_nonfinite: skip_step to skip such steps."
        )

    def _track_best(self, metrics: dict[str, float]) -> bool:
        state = self.state
        if self.cfg.best_metric is None:
            state.best_epoch = state.epoch
            return True
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
        """Everything a resume needs. What differs between ranks (random states, unreduced step
        results, a task's carried state) is kept for each rank under `ranks`."""
        own = {
            "task": _moved(self.task.state_dict(), torch.device("cpu")),
            "window": [_moved(asdict(r), torch.device("cpu")) for r in self.window],
            "rng": rng_state(),
        }
        state = {
            "models": {name: m.state_dict() for name, m in self.task.models.items()},
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "scaler": self.updater.scaler.state_dict(),
            "loop": asdict(self.state),
            **own,
        }
        if self.ranks.world > 1:
            state["ranks"] = self.ranks.gather(own)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, model in self.task.models.items():
            model.load_state_dict(state["models"][name])
        for name, optimizer in self.optimizers.items():
            # the state (moments, momentum) and lr come from the checkpoint; the other
            # hyperparameters from the config, which a resume with --allow-changes may change
            configured = [{k: v for k, v in g.items() if k not in ("params", "lr")}
                          for g in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizers"][name])
            for group, settings in zip(optimizer.param_groups, configured, strict=True):
                group.update(settings)
        self.updater.scaler.load_state_dict(state["scaler"])
        self.state = LoopState(**state["loop"])
        self.state.stop_reason = None
        own = self._own_state(state)
        self.task.load_state_dict(own.get("task", {}))
        self.window = [StepResult(**_moved(r, self.device)) for r in own["window"]]
        set_rng_state(own["rng"])
        self.resumed = True

    def _own_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of a checkpoint; a run resumes with as many processes as it had."""
        saved = len(state.get("ranks") or [state])
        if saved != self.ranks.world:
            raise KdlError(
                f"this checkpoint was written by a run of {saved} process(es); resume it with as "
                f"many: kdl train --resume RUN" + (f" --nproc-per-node {saved}" if saved > 1 else "")
                + " (the same --nnodes too)"
            )
        return state["ranks"][self.ranks.rank] if "ranks" in state else state

    def _save(self, *which: str, meta: dict[str, Any] | None = None) -> None:
        """Flush metrics, then write the checkpoint(s) (and then `meta` into meta.json), in the
        background while training goes on; never with non-finite weights."""
        if self.window:
            self._check_finite(_reduce(self.window, self.ranks.sum)[1])
        # every parameter looked at on its device, then one answer read: one sync on a GPU
        params = [p for m in self.task.models.values() for p in m.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            self._nonfinite(self.state.step - 1, "the weights")
        self.run.save_checkpoint(which, self.state_dict(), meta)


class Stop:
    """SIGINT and SIGTERM for a run's whole life: from before its folder exists to its last file.

    The first signal asks the loop to stop after its step, with a checkpoint (a run stopped
    before its first step saves step 0: it is `interrupted` and resumable). A second SIGINT
    stops the loop at once; outside the loop (start-up, the final writes) signals are only
    recorded, so no write of the run's files is ever cut short.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False
        self.world = 1  # training processes: with several, a second SIGINT is torchrun's echo
        self._log: Callable[[str], None] | None = None
        self._notice: Callable[[str], None] | None = None
        self._installed = False

    def attach(self, log: Callable[[str], None], notice: Callable[[str], None]) -> None:
        """Log signals into the run's train.log and say them on the screen (`notice`, safe in a
        signal handler) from now on, and one that came before."""
        self._log, self._notice = log, notice
        if self.signum is not None:
            self._say(self.signum)

    def _say(self, signum: int) -> None:
        if self._log is not None:
            self._log(f"received {signal.Signals(signum).name}: stopping after this step")
        if self._notice is not None:
            self._notice(
                "Ctrl-C: stopping after this step with a checkpoint; Ctrl-C again to stop now"
                if signum == signal.SIGINT else
                f"{signal.Signals(signum).name}: stopping after this step with a checkpoint"
            )

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handlers in place for the block (nested uses keep the outer ones)."""
        if self._installed:
            yield
            return
        owner = os.getpid()

        def handler(signum: int, frame: Any) -> None:
            # a DataLoader worker forked with this handler, before it sets its own (data/__init__)
            if os.getpid() != owner:
                return
            # (torchrun forwards a terminal's Ctrl-C that every process already got: a second
            # SIGINT is the same one there, not a request to abandon the step)
            if self.signum is not None and signum == signal.SIGINT and self.in_loop and self.world == 1:
                raise KeyboardInterrupt
            first = self.signum is None
            self.signum = self.signum or signum
            if first:
                self._say(signum)

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        self._installed = True
        try:
            yield
        finally:
            self._installed = False
            for s, old in previous.items():
                signal.signal(s, old)


def _better(value: float, best: float, mode: str, min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta


# ----------------------------------------------------------------------------- step results


def _reduce(window: list[StepResult], total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
            ) -> tuple[Totals, list[bool]]:
    """The window's totals and, per step, whether all its losses were finite: one host sync.
    `total` adds the values up over the ranks (one all-reduce), so every rank gets the same."""
    loss_names, sum_names = list(window[0].losses), list(window[0].sums)
    losses = torch.stack([torch.stack([r.losses[n] for r in window]).float() for n in loss_names],
                         dim=1)  # (steps, losses)
    counts = torch.tensor([r.count for r in window], dtype=torch.float32, device=losses.device)
    nonfinite = (~torch.isfinite(losses).all(dim=1)).float()  # (steps,)
    loss_sums = (losses * counts[:, None]).sum(dim=0)  # (losses,)
    metric_sums = [torch.stack([torch.as_tensor(r.sums[n]) for r in window]).float().sum().to(
        losses.device) for n in sum_names]
    host = total(torch.cat([nonfinite, counts.sum()[None], loss_sums, torch.stack(metric_sums)
                            if metric_sums else loss_sums.new_zeros(0)])).tolist()
    steps = len(window)
    totals = Totals(
        count=host[steps],
        losses=dict(zip(loss_names, host[steps + 1:steps + 1 + len(loss_names)], strict=True)),
        sums=dict(zip(sum_names, host[steps + 1 + len(loss_names):], strict=True)),
    )
    return totals, [f == 0 for f in host[:steps]]


def _add(epoch: dict[str, Any], totals: Totals) -> dict[str, Any]:
    """Running epoch totals (plain floats, saved in checkpoints) plus a window's."""
    if not epoch:
        return asdict(totals)
    return {"count": epoch["count"] + totals.count,
            "losses": {k: epoch["losses"][k] + v for k, v in totals.losses.items()},
            "sums": {k: epoch["sums"][k] + v for k, v in totals.sums.items()}}


def _totals(epoch: dict[str, Any]) -> Totals:
    return Totals(count=epoch["count"], losses=dict(epoch["losses"]), sums=dict(epoch["sums"]))


def _moved(tree: Any, device: torch.device) -> Any:
    """A step result's tensors moved to `device` (a checkpoint keeps them on the CPU)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to(device)
    if isinstance(tree, dict):
        return {k: _moved(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_moved(v, device) for v in tree)
    return tree


@torch.no_grad()
def evaluate(
    task: Task,
    batches: Batches,
    prepare: Prepare,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    detailed: bool = False,
) -> dict[str, Any]:
    """Run the task's eval step over every batch, add up on the device, summarise on the host."""
    task.train(False)
    task.on_eval_start()
    count, losses, sums = 0, {}, {}
    for batch in batches.epoch():
        with autocast():
            result = task.eval_step(prepare(batch, None), detailed)
        count += result.count
        for name, loss in result.losses.items():
            weighted = loss.float() * result.count
            losses[name] = losses[name] + weighted if name in losses else weighted
        for name, value in result.sums.items():
            sums[name] = sums[name] + value if name in sums else value
    task.train(True)
    totals = Totals(
        count=float(count),
        losses={k: float(v) for k, v in losses.items()},
        sums={k: (v.cpu() if isinstance(v, torch.Tensor) and v.dim() else float(v))
              for k, v in sums.items()},
    )
    return task.summarize(totals, detailed)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every random state a run touches, as plain values that load with weights_only=True."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    # (np.array of the 625 Python ints: a third of the time torch.tensor takes)
    return {
        "python": [version, torch.from_numpy(np.array(keys, dtype=np.int64)), gauss],
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
