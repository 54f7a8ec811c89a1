"""The one training loop: epochs, checkpoints and exact resume, signals, logging, best checkpoint
and early stopping. Tasks plug in their step; the loop never changes per task.

Per step the loop does no host-device sync, no file write and no progress redraw: step results
stay on the device in a small window that is reduced every `log_every_steps`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config.training import TrainConfig
from .data import Batches, Prepare
from .distributed import SINGLE, Ranks
from .errors import KdlError, RunFailed
from .optim import LRSchedule
from .rng import rng_state, set_rng_state
from .runfolder.writer import RunWriter
from .signals import Stop
from .tasks import StepResult, Task
from .tasks.base import evaluate
from .tasks.steps import add_totals, moved, reduce_window, totals_of
from .ui.progress import Reporter, format_metrics
from .updater import Updater


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


@dataclass
class Optimization:
    """One optimizer and one lr schedule per trainable model, by the model's name."""

    optimizers: dict[str, torch.optim.Optimizer]
    schedules: dict[str, LRSchedule]


@dataclass
class Feed:
    """What the loop trains and validates on: batches as the data gives them, and `prepare`,
    which turns each into the tensors a task steps on, on `device`."""

    train: Batches
    val: Batches | None
    prepare: Prepare
    device: torch.device


class Trainer:
    """Drives a task through its epochs (`fit`); `state_dict` and `load_state_dict` are what a
    checkpoint holds of it, and what a resume restores."""

    def __init__(self, cfg: TrainConfig, task: Task, optimization: Optimization, feed: Feed,
                 run: RunWriter, reporter: Reporter, ranks: Ranks = SINGLE):
        self.cfg = cfg
        self.task = task
        self.optimizers, self.schedules = optimization.optimizers, optimization.schedules
        self.feed = feed
        self.run = run
        self.reporter = reporter
        self.ranks = ranks
        self.updater = Updater(self.optimizers, list(task.models.values()), cfg.precision,
                               feed.device, cfg.grad_clip, cfg.on_nonfinite == "skip_step", ranks)
        self.state = LoopState()
        self.resumed = False
        self.window: list[StepResult] = []  # per-step results since the last log line
        # no best metric (a GAN's): best.pt is the latest epoch's
        self.best_mode = self.mode(cfg.best_metric, cfg.best_mode) if cfg.best_metric else None
        self.stop_metric = cfg.early_stopping.metric or cfg.best_metric
        self.stop_mode = self.mode(self.stop_metric, cfg.early_stopping.mode) if self.stop_metric else None
        self.stop = Stop()
        self.started = time.time()
        self._window_started = time.perf_counter()
        self._window_samples = 0
        self._compiling = cfg.compile
        self.last_metrics: dict[str, float] = {}
        self.until_epoch: int | None = None  # fit's: pause once this many epochs are done
        self._deadline: float | None = None  # fit's: when train.max_minutes is spent (monotonic)

    def mode(self, metric: str, configured: str) -> str:
        """min or max: as configured, or (auto) the direction the task declares for the metric."""
        return configured if configured != "auto" else self.task.metrics[metric.split(".", 1)[1]]

    # ------------------------------------------------------------------ the loop

    def fit(self, stop: Stop | None = None, until_epoch: int | None = None,
            trained_before: float = 0.0) -> LoopState:
        """Train to train.epochs (or max_steps, early stopping, a stop signal, train.max_minutes
        counted on from `trained_before` seconds, or the pause after epoch `until_epoch`), under
        `stop`'s signal handlers."""
        self.stop, self.until_epoch = stop or Stop(), until_epoch
        self.stop.world = self.ranks.world
        minutes = self.cfg.max_minutes
        self._deadline = None if minutes is None else time.monotonic() - trained_before + minutes * 60
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
        return self.state

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
        total = len(self.feed.train)
        self.task.train(True)
        self.reporter.start_epoch(state.epoch, cfg.epochs, total, state.batch,
                                  min(total * cfg.epochs, cfg.max_steps or total * cfg.epochs))
        if state.batch == 0:  # (a run resumed mid-epoch keeps the task's state from its checkpoint)
            self.task.on_epoch_start(state.epoch)
        for batch in self.feed.train.epoch(state.epoch, start=state.batch):
            # learning rate for this step: the schedule's value times each group's multiplier
            self._set_lr(state.step)
            # forward, backward, update: the task's own step, through the updater
            self.updater.begin_step()
            self.updater.loss_scale = self.ranks.loss_scale(self._batch_items(state.batch))  # (alone: 1)
            prepared = self.feed.prepare(batch, self.ranks.draw(state.step))
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
            # a budget spent ends the partial epoch as an epoch ends: its val, its checkpoint
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                state.stop_reason = "max_steps"
                break
            if self._out_of_time():
                state.stop_reason = "max_minutes"
                break
            # a val due at this step comes before any checkpoint of it, which a resume goes on
            # from: a stop here never skips it (the epoch's end validates anyway)
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0 and state.batch < total:
                self._validate_mid_epoch()
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
        if self.feed.device.type == "cuda":
            torch.cuda.synchronize(self.feed.device)
        seconds = time.perf_counter() - self._window_started
        self.run.log(f"torch.compile: the first step (compiling) took {seconds:.1f} s")
        self.run.update_meta(compile_s=round(seconds, 3))
        self._compiling = False
        self._window_started, self._window_samples = time.perf_counter(), 0

    def _out_of_time(self) -> bool:
        """Has the run trained train.max_minutes, over its resumes? All ranks answer alike."""
        return self._deadline is not None and bool(
            self.ranks.largest(int(time.monotonic() >= self._deadline)))

    def _validate_mid_epoch(self) -> None:
        """A val record within the epoch (train.eval_every_steps). Training goes on as if it had
        not happened: the random states are forked around it, the task keeps its training
        state, and its time is left out of the window's samples/s."""
        began = time.perf_counter()
        state, device = self.state, self.feed.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            val = self._validate(mid_epoch=True)
        self.run.flush_metrics()
        line = (f"epoch {state.epoch + 1}/{self.cfg.epochs} step {state.step}  "
                f"{format_metrics({f'val.{k}': v for k, v in val.items()})}")
        self.run.log(line)
        self.reporter.message(line)
        self._window_started += time.perf_counter() - began

    def _validate(self, **marks: Any) -> dict[str, float]:
        """The val split's metrics, recorded in metrics.jsonl at this step (with `marks`)."""
        self.ranks.broadcast_buffers(list(self.task.models.values()))  # every rank: rank 0's model
        val = evaluate(self.task, self.feed.val, self.feed.prepare, self.updater.autocast)
        self._record("val", {**marks, **val})
        return val

    def _record(self, split: str, fields: dict[str, Any]) -> None:
        """A metrics.jsonl record of this step: step, epoch (1-based), split, fields, time."""
        self.run.log_metrics({"step": self.state.step, "epoch": self.state.epoch + 1, "split": split,
                              **fields, "time": round(time.time() - self.started, 3)})

    def _stopping(self) -> bool:
        """Whether a stop signal came, to this rank or (agreed every step) to any other: all
        ranks stop after the same step. A signal is logged and said here, once (its handler
        only records it)."""
        if self.ranks.world == 1:
            stopping = self.stop.signum is not None
        else:
            # a signal that lands while the ranks compare is kept for the next step's comparison
            # (never overwritten by this one's answer): every rank stops after the same step
            agreed = self.ranks.largest(self.stop.signum or 0)
            if agreed and self.stop.signum is None:
                self.stop.signum = agreed
            stopping = bool(agreed)
        if stopping:
            self.tell_signal()
        return stopping

    def tell_signal(self) -> None:
        """Log and show a signal that came, if not done yet."""
        name = self.stop.heard()
        if name is not None:
            self.run.log(f"received {name}: stopping after this step")
            self.reporter.notice(Stop.notice(name))

    def _batch_items(self, index: int) -> int:
        """How many items global batch `index` of an epoch holds (the last may be short)."""
        size = self.feed.train.batch_size
        return min(size, len(self.feed.train.dataset) - index * size)

    def _set_lr(self, step: int) -> None:
        for name, optimizer in self.optimizers.items():
            lr = self.schedules[name].lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def _end_epoch(self) -> None:
        cfg, state = self.cfg, self.state
        self._flush_window()
        train = self.task.summarize(totals_of(state.epoch_sums)) if state.epoch_sums else {}
        self._record("train_epoch", train)
        metrics = {f"train.{k}": v for k, v in train.items()}
        if self.feed.val is not None:
            metrics.update({f"val.{k}": v for k, v in self._validate().items()})
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
            if r.get("epoch") == self.state.epoch and r.get("split") in splits and not r.get("mid_epoch")
            for k, v in r.items() if k not in ("step", "epoch", "split", "time")
        }

    def _log_examples(self) -> None:
        """The task's view of the first training items, into TensorBoard."""
        dataset = self.feed.train.dataset
        sample = self.task.example_inputs(dataset.get_batch(torch.arange(min(32, len(dataset)))))
        if sample is not None:
            self.run.tensorboard("train/examples", sample)

    # ------------------------------------------------------------------ metrics

    def _flush_window(self) -> None:
        """Reduce the window's step results on the host; the only sync in the train loop."""
        if not self.window:
            return
        state = self.state
        totals, finite = reduce_window(self.window, self.ranks.sum)
        self._check_finite(finite)
        self.window = []
        state.epoch_sums = add_totals(state.epoch_sums, totals)
        metrics = self.task.summarize(totals)
        elapsed = time.perf_counter() - self._window_started
        samples_per_s = totals.count / elapsed if elapsed > 0 else 0.0
        self._record("train", {**metrics, **self._lrs(state.step - 1),
                               "samples_per_s": round(samples_per_s, 1)})
        self.run.flush_metrics()  # a reader sees each interval's record (to the OS: no fsync)
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
            "task": moved(self.task.state_dict(), torch.device("cpu")),
            "window": [moved(asdict(r), torch.device("cpu")) for r in self.window],
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
        self.window = [StepResult(**moved(r, self.feed.device)) for r in own["window"]]
        set_rng_state(own["rng"])
        self.resumed = True

    def _own_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of a checkpoint; a run resumes with as many processes as it had."""
        saved = len(state.get("ranks") or [state])
        if saved != self.ranks.world:
            how = f" --nproc-per-node {saved}" if saved > 1 else ""
            raise KdlError(f"this checkpoint was written by a run of {saved} process(es); resume it "
                           f"with as many: {self.run.resume_command}{how} (the same --nnodes too)")
        return state["ranks"][self.ranks.rank] if "ranks" in state else state

    def _save(self, *which: str, meta: dict[str, Any] | None = None) -> None:
        """Flush metrics, then write the checkpoint(s) (and then `meta` into meta.json), in the
        background while training goes on; never with non-finite weights, nor ranks' that differ."""
        if self.window:
            self._check_finite(reduce_window(self.window, self.ranks.sum)[1])
        # every parameter looked at on its device, then one answer read: one sync on a GPU
        params = [p for m in self.task.models.values() for p in m.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            self._nonfinite(self.state.step - 1, "the weights")
        self.ranks.check_same(params)
        self.run.save_checkpoint(which, self.state_dict(), meta)


def _better(value: float, best: float, mode: str, min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta
