"""`kdl train`: what a plan asks for (a fresh run or a resume) built, the run folder created or
reopened, the loop driven, and the run's end left truthful in its folder whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed, workers
from .build import Experiment, build_experiment, build_trainer, checkpoint_must_fit, versions
from .config.root import SCHEMA_MAJOR, Config
from .distributed import Ranks
from .dotted import flatten
from .errors import KdlError, RunFailed
from .loop import Trainer
from .plan import Plan
from .runfolder import fsio, layout
from .runfolder.checkpoint import check_vocabulary, load_checkpoint
from .runfolder.writer import RunWriter
from .signals import Stop
from .trackers.base import Setup
from .ui.progress import Reporter, format_duration

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
        _check_processes(plan.cfg, ranks, device)
        exp = build_experiment(plan.cfg, device, vocabulary=plan.run.vocabulary() if plan.run else None)
        session = Session(exp, command, reporter, Stop(), ranks, plan.until_epoch)
        with session.stop.installed():  # before the folder exists: no moment of a run is unguarded
            if plan.run is None:
                result = session.start(runs_root, plan.sweep)
            else:
                result = session.resume(plan.run.path, plan.changes)
        if result.status != "failed":  # every rank is done with the others before they part
            ranks.barrier()
        return result
    finally:
        plan.release()
        ranks.close()


def _check_processes(cfg: Config, ranks: Ranks, device: str | None) -> None:
    """Refuse what several processes cannot train, and configs that differ between them (the
    commands of several machines), before anything is built or written: every rank refuses
    together, after the others have joined (none left joining a group that is gone)."""
    if not ranks.all_true(ranks.share(cfg.hash()) == cfg.hash()):  # machines given other commands
        raise KdlError("the training processes were not all given the same config: the commands "
                       "started on the machines differ in their config file, --set values or run to "
                       "resume. Run the same command on every machine, with its own --node-rank")
    if not ranks.all_true(ranks.even):  # (a machine of the mean count among others sees no fault)
        raise KdlError(f"the machines were not all given the same --nproc-per-node: {ranks.world} "
                       f"training processes on {ranks.nodes} machines, {ranks.here} of them on this one. "
                       "Run the same command on every machine, with its own --node-rank: a run over "
                       "several machines trains as many processes on each, and resumes so")
    problem = None
    if cfg.data.batch_size < ranks.world:
        problem = (f"data.batch_size is {cfg.data.batch_size}, the global batch, but {ranks.world} "
                   f"processes train: set data.batch_size to at least {ranks.world} (a multiple of it "
                   "gives every process the same share)")
    elif cfg.train.sync_batch_norm and ranks.world > 1 and not (device or "").startswith("cuda"):
        problem = (f"train.sync_batch_norm: true, but these {ranks.world} processes train on the CPU, "
                   "and torch's SyncBatchNorm works on CUDA GPUs only: set train.sync_batch_norm: false "
                   "(each process then normalises its own share of the batch)")
    if not ranks.all_true(problem is None):
        raise KdlError(problem or "another training process refused this config (its error says why)")


@dataclass
class Session:
    """One process's training of one run: the experiment built from its config, how the process
    was started (`command`), where it reports, its signals and its place among the processes;
    `until_epoch`: pause after that epoch (a search's rung)."""

    exp: Experiment
    command: list[str]
    reporter: Reporter
    stop: Stop
    ranks: Ranks = field(default_factory=Ranks)
    until_epoch: int | None = None

    def start(self, runs_root: Path, sweep: dict[str, Any] | None = None) -> TrainResult:
        """A new run folder for the experiment, trained to the end (or a stop, or the pause)."""
        cfg, exp, ranks = self.exp.cfg, self.exp, self.ranks
        # rank 0 makes (and locks) the folder and tells the other ranks where it is
        made = RunWriter.create(runs_root, cfg.name, cfg.to_yaml()) if ranks.primary else None
        folder = ranks.share(made.folder if made else None)
        writer = made or RunWriter(folder, rank=ranks.rank)
        with writer.lock or contextlib.nullcontext():
            trainer = build_trainer(exp, writer, self.reporter, ranks)
            # a run torchrun started, one process included (a one-GPU DDP run), says so
            processes = ({"processes": ranks.world, "nodes": ranks.nodes, "backend": ranks.backend}
                         if ranks.backend else {})
            writer.start({
                "name": cfg.name, "task": exp.task.name, "model": cfg.model.name,
                "dataset": cfg.data.name, "config_hash": cfg.hash(), "config_schema": SCHEMA_MAJOR,
                "device": str(exp.device), "epochs": cfg.train.epochs, "until_epoch": self.until_epoch,
                "metric_modes": exp.task.metrics, "versions": versions(exp.device),
                **({"sweep": sweep} if sweep else {}), **processes,
            }, self.command, self._tracking())
            if exp.data.info.vocabulary:
                writer.write_vocabulary(exp.data.info.vocabulary)
            writer.encodes_with(exp.data.info.vocabulary)
            writer.log(f"run {writer.id} started: {cfg.name} on {exp.device}")
            self.reporter.message(f"run {writer.id}: {writer.folder}")
            return self._drive(trainer, writer, previous_duration=0.0)

    def resume(self, folder: Path, changes: dict[str, Any]) -> TrainResult:
        """Continue the run in `folder` from its last checkpoint; a run killed before its first
        checkpoint starts again from step 0, as it did the first time."""
        exp = self.exp
        writer = RunWriter(folder, rank=self.ranks.rank)
        trainer = build_trainer(exp, writer, self.reporter, self.ranks)
        last = writer.checkpoint("last")
        if last.is_file():
            checkpoint = load_checkpoint(last)
            check_vocabulary(checkpoint, exp.data.info.vocabulary, last, folder / layout.VOCAB)
            with checkpoint_must_fit(last):
                trainer.load_state_dict(checkpoint)
            trainer.restore_last_metrics(fsio.read_jsonl(folder / layout.METRICS))
        if exp.data.info.vocabulary and not (folder / layout.VOCAB).is_file():
            writer.write_vocabulary(exp.data.info.vocabulary)  # killed before it was written
        writer.encodes_with(exp.data.info.vocabulary)
        # the config is rewritten only now: a change the checkpoint cannot take leaves the run as it was
        rewrite = bool(changes) or "pending_config" in writer.meta
        writer.resume(trainer.state.step, self.command, changes, exp.cfg.to_yaml() if rewrite else None,
                      {"epochs": exp.cfg.train.epochs, "until_epoch": self.until_epoch,
                       "config_hash": exp.cfg.hash(), "config_schema": SCHEMA_MAJOR}, self._tracking())
        writer.log(f"===== resumed at epoch {trainer.state.epoch} step {trainer.state.step} =====")
        self.reporter.message(f"run {writer.id}: resumed {_position(trainer)}: {writer.folder}")
        return self._drive(trainer, writer, previous_duration=float(writer.meta.get("duration_s") or 0.0))

    def _tracking(self) -> Setup:
        """What the trackers get of the config: their own settings, the config flat (dotted
        names, as --set writes them), the metric tags to compare runs by."""
        cfg, metrics = self.exp.cfg, self.exp.task.metrics
        return Setup(cfg.train.loggers, cfg.train.mlflow, cfg.train.wandb, cfg.name, flatten(cfg.to_dict()),
                     [f"{split}/{metric}" for split in ("val", "train_epoch") for metric in metrics])

    def _drive(self, trainer: Trainer, writer: RunWriter, previous_duration: float) -> TrainResult:
        """Run the loop and leave the run folder in a final, truthful state whatever happens."""
        began = time.time()
        status, exit_code, error = "completed", 0, None
        try:
            state = trainer.fit(self.stop, self.until_epoch, previous_duration)
            if state.stop_reason == "signal":
                status, exit_code = "interrupted", EXIT_SIGNALS.get(self.stop.signum, 130)
            elif state.stop_reason == "paused":
                status = "paused"
        except KeyboardInterrupt:
            trainer.tell_signal()  # the first Ctrl-C, if the second came within its step
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
            if self.ranks.world > 1:
                error += " (Another training process may have stopped first: see its output.)"
        finally:
            self.reporter.close()
        duration = previous_duration + time.time() - began
        summary = _summary(trainer, status, duration)
        try:
            try:
                writer.finish(status, error, duration, summary)
            finally:  # its threads (checkpoints, heartbeat) end whatever the disk said
                writer.close()
        except OSError as exc:  # e.g. the disk filled up: say so, keep the original error first
            status, exit_code = "failed", exit_code or 1
            error = (error + " " if error else "") + (
                f"The run folder {writer.folder} could not be updated ({exc.strerror or exc})."
            )
        self._say_end(trainer, writer, status, error, summary)
        return TrainResult(writer.id, writer.folder, status, exit_code, summary, rank=writer.rank)

    def _say_end(self, trainer: Trainer, writer: RunWriter, status: str, error: str | None,
                 summary: dict[str, Any]) -> None:
        """The run's last lines: why it failed, where it stopped and how to go on, or what it
        reached and what to do next."""
        if error:  # shown even with --quiet: a failed run must say why
            workers.say_error(error, f"rank {writer.rank}: " if writer.rank else "")
        elif status == "interrupted":  # also shown with --quiet: where it stopped, how to go on
            saved = ("with a checkpoint" if trainer.state.stop_reason == "signal"
                     else "at once: resume goes on from the last checkpoint")
            self.reporter.notice(f"interrupted {_position(trainer)}, {saved}; resume with "
                                 f"{self._resume_command(writer)}")
        elif status == "paused":
            self.reporter.notice(f"paused {_position(trainer)} at --until-epoch {self.until_epoch}; "
                                 f"go on with {self._resume_command(writer)}")
        else:
            _print_summary(self.reporter, summary)
            for line in self._next_steps(writer.folder):
                self.reporter.message(line)

    def _resume_command(self, writer: RunWriter) -> str:
        """The command that resumes the run, quoted: `kdl train --resume ID` (a run of several
        processes on one machine is started again with as many), or for a run over several
        machines, this machine's command and what the others run."""
        command = writer.resume_command
        if self.ranks.nodes == 1:
            return f"`{command}`"
        per_node = self.ranks.world // self.ranks.nodes
        command += (f" --nproc-per-node {per_node} --nnodes {self.ranks.nodes} --node-rank 0 "
                    f"--master-addr {os.environ.get('MASTER_ADDR')} --master-port "
                    f"{os.environ.get('MASTER_PORT')}")
        return f"`{command}` here, and the same with its own --node-rank on each other machine"

    def _next_steps(self, folder: Path) -> list[str]:
        """Commands that work on the finished run as they are printed: an evaluation on the test
        split if the data has one (else on val), where the task's eval can run here (a GAN's
        needs a classifier: Inception-v3 cached, or --features), a sample if the task draws, and
        `kdl show`."""
        from .evaluate import inception_weights

        exp, lines, run = self.exp, [], layout.run_ref(folder)
        if not exp.task.draws_images or exp.task.scores_optional or inception_weights().is_file():
            if exp.data.test is not None:
                lines.append(f"test it:   kdl eval {run} --split test")
            elif exp.data.val is not None:
                lines.append(f"evaluate:  kdl eval {run}")
        if exp.task.can_sample:
            lines.append(f"sample it: kdl sample {run}")
        return [*lines, f"inspect:   kdl show {run}"]


def _position(trainer: Trainer) -> str:
    """'in epoch 3/10 at step 173' or 'after epoch 2/10 (step 120)': where the loop stands."""
    state, epochs = trainer.state, trainer.cfg.epochs
    if state.batch:
        return f"in epoch {state.epoch + 1}/{epochs} at step {state.step}"
    return f"after epoch {state.epoch}/{epochs} (step {state.step})"


def _print_summary(reporter: Reporter, summary: dict[str, Any]) -> None:
    """The line that ends a finished run: how long, the best epoch, why it stopped early."""
    best = summary["best"]
    line = (f"done in {format_duration(summary['duration_s'])}: {summary['epochs_done']} epochs, "
            f"{summary['steps']} steps")
    if best["metric"] and best["value"] is not None:
        line += f"; best {best['metric']} {best['value']:.4g} at epoch {best['epoch']}"
    if summary["stop_reason"] not in (None, "signal", "paused"):
        line += f" (stopped early: {summary['stop_reason']})"
    reporter.message(line)


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
