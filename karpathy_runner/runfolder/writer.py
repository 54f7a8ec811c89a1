"""The run writer: every file a process writes into a run folder goes through here.

config.yaml, meta.json (the first write, updates, resumes, the end), metrics.jsonl, train.log,
summary.json, checkpoints, samples, the trackers (TensorBoard events, MLflow, W&B) and eval
JSON. Files that are replaced are written atomically (fsio.atomic_write); metrics.jsonl and
train.log are appended to.
Nothing is opened until it is written, so `kdl eval` and `kdl sample` use the same writer
without touching a run's logs. In a run of several processes only rank 0 writes: the other
ranks' writers know the folder (to resume from its checkpoint) and write nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import KdlError, RunFailed
from ..trackers.base import Opening, Setup, Tracker, open_trackers
from ..ui.pictures import png_grid
from . import fsio, layout, locks
from .checkpoint import InBackground, captured, save_checkpoint, vocabulary_digest
from .layout import utc_now

Method = TypeVar("Method", bound=Callable[..., Any])


def _rank_zero(method: Method) -> Method:
    """A write that only rank 0 makes; on the other ranks it does nothing (returns None)."""

    @functools.wraps(method)
    def write(self: RunWriter, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs) if self.rank == 0 else None

    return write  # type: ignore[return-value]


class RunWriter:
    def __init__(self, folder: Path, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank  # of this process among the training processes
        self.meta: dict[str, Any] = fsio.read_json(self.folder / layout.META)
        self._metrics: IO[str] | None = None
        self._log: IO[str] | None = None
        self.trackers: list[Tracker] = []  # opened when training starts or resumes
        self.lock: locks.RunLock | None = None  # a new run's, taken with its folder
        self._saving = InBackground()  # the checkpoint being written while training goes on
        self._covering = False  # has it trackers' records to hand over once it is on disk?
        self._folders: dict[Path, int] = {}  # descriptors the checkpoint thread fsyncs
        self._vocabulary: str | None = None  # the digest of the run's vocabulary (encodes_with)
        self._heartbeat: layout.Heartbeat | None = None  # while it trains: its .lock kept fresh
        if rank == 0:  # what it will write is the run's own, before anything is written
            for name in layout.OWN_FILES:
                fsio.refuse_foreign(self.folder / name, stat.S_ISREG)
            for name in layout.OWN_FOLDERS:
                fsio.refuse_foreign(self.folder / name, stat.S_ISDIR)

    @classmethod
    def create(cls, root: Path, name: str, config_yaml: str) -> RunWriter:
        """A new run folder (atomic mkdir: parallel launches never share one), locked by this
        process, with its config."""
        folder = layout.create_run_folder(root, name)
        writer = cls(folder)
        try:
            writer.lock = locks.RunLock(folder).acquire()
        except KdlError:  # (a file system without locks) the folder just made, and nothing in it
            shutil.rmtree(folder, ignore_errors=True)
            raise
        writer.write_config(config_yaml)
        return writer

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def resume_command(self) -> str:
        """The command that continues this run, as kdl prints it (its runs folder included where
        the command would not find it)."""
        return f"kdl train --resume {layout.run_ref(self.folder)}"

    # ------------------------------------------------------------------ run lifecycle

    @_rank_zero
    def write_config(self, config_yaml: str) -> None:
        """The resolved config, headed like every config by the command that runs it again."""
        path = self.folder / layout.CONFIG
        fsio.write_text(path, f"# kdl train {path}\n" + config_yaml)

    @_rank_zero
    def start(self, fields: dict[str, Any], command: list[str], tracking: Setup) -> None:
        """The first meta.json of a fresh run, then its trackers (`train.loggers`)."""
        now = utc_now()
        self.update_meta(id=self.id, status="running", created_at=now, started_at=now,
                         ended_at=None, duration_s=0.0, epochs_done=0, step=0, **fields,
                         **layout.run_environment(command))
        (self.folder / layout.METRICS).touch()  # present from the start, even with no record yet
        self._open_trackers(tracking)
        self._heartbeat = layout.Heartbeat(self.folder / layout.LOCK, layout.HEARTBEAT_S)

    @_rank_zero
    def resume(self, step: int, command: list[str], changes: dict[str, Any],
               config_yaml: str | None, fields: dict[str, Any], tracking: Setup) -> None:
        """Continue this folder from a checkpoint at `step`: a changed config (only once the
        checkpoint has loaded), metrics and TensorBoard events after `step` dropped, the resume
        recorded in meta.json (with `fields`: the epochs and config hash it now trains with; the
        hash before, when the config changes) and train.log, the trackers reopened."""
        kept = self._keep_metrics_up_to(step)
        environment = layout.run_environment(command)
        live = {"status": "running",
                **{k: environment[k] for k in ("command", "host", "pid", "pid_started", "heartbeat_s")}}
        record = {"at": utc_now(), "step": step, "command": command, "changes": changes}
        self.meta["resumes"] = [*self.meta.get("resumes", []), record]
        if config_yaml is not None:
            # recorded (pending), then applied, then marked done: a kill in between leaves a
            # pending change that the next resume applies, never an unrecorded one
            record["config_hash_before"] = self.meta.get("config_hash")
            self.update_meta(pending_config=config_yaml, **live)
            self.write_config(config_yaml)
            self.meta.pop("pending_config")
        self.update_meta(**live, **fields)
        self._open_trackers(tracking, resumed_at=step, history=kept)
        self._heartbeat = layout.Heartbeat(self.folder / layout.LOCK, layout.HEARTBEAT_S)

    @_rank_zero
    def finish(self, status: str, error: str | None, duration: float, summary: dict[str, Any]) -> None:
        """summary.json, then meta.json: the status written last commits the run's end, so a
        kill in between leaves a run that is still `running` (crashed) and resumes to the end.
        meta.json's best is the summary's too, as the checkpoint has it: a kill after the last
        checkpoint, before its meta.json, leaves the epoch before's there for the resume to set."""
        evals = fsio.read_json(self.folder / layout.SUMMARY).get("eval")  # from `kdl eval` meanwhile
        fsio.write_json(self.folder / layout.SUMMARY, {**summary, **({"eval": evals} if evals else {})})
        self.update_meta(status=status, ended_at=utc_now(), duration_s=round(duration, 3),
                         error=error, epochs_done=summary["epochs_done"], step=summary["steps"],
                         best=summary["best"])
        self.log(f"run {status}" + (f": {error}" if error else ""))
        files = [self.folder / layout.CONFIG, self.folder / layout.SUMMARY]
        self._tell_trackers(lambda tracker: tracker.finish(status, files))

    @_rank_zero
    def write_vocabulary(self, vocabulary: list[str]) -> None:
        """vocab.json: the token list the run's data was encoded with, for every later command."""
        fsio.write_json(self.folder / layout.VOCAB, vocabulary)

    def encodes_with(self, vocabulary: list[str] | None) -> None:
        """The vocabulary the run trains with: its digest goes into every checkpoint."""
        self._vocabulary = vocabulary_digest(vocabulary)

    @_rank_zero
    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        fsio.write_json(self.folder / layout.META, self.meta)

    # ------------------------------------------------------------------ logs

    @_rank_zero
    def log_metrics(self, record: dict[str, Any]) -> None:
        """Buffered: reaches the disk at `flush()` (every epoch and every checkpoint)."""
        if self._metrics is None:
            self._metrics = fsio.open_append(self.folder / layout.METRICS)
        self._metrics.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.record(record)

    @_rank_zero
    def log(self, line: str) -> None:
        if self._log is None:
            self._log = fsio.open_append(self.folder / layout.LOG)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"{stamp} {line}\n")
        self._log.flush()

    def flush_metrics(self) -> None:
        """metrics.jsonl's buffered records handed to the OS (no fsync): readers see them."""
        if self._metrics is not None:
            self._metrics.flush()

    def flush(self, sync: bool = True) -> None:
        """Buffered records handed to the OS; metrics.jsonl also fsynced when `sync` (a
        checkpoint's thread fsyncs it itself, before the checkpoint)."""
        if self._metrics is not None:
            self._metrics.flush()
            if sync:
                os.fsync(self._metrics.fileno())
        for tracker in self.trackers:
            tracker.flush()

    def tensorboard(self, tag: str, sample: Any, step: int = 0) -> None:
        """A task's images or text (example inputs, samples) into TensorBoard and the other
        trackers."""
        for tracker in self.trackers:
            if sample.images is not None:
                tracker.images(tag, sample.images, step)
            elif sample.text is not None:
                tracker.text(tag, sample.text, step)

    def close(self) -> None:
        self._saving.close()  # (its thread is done with metrics.jsonl and the folders)
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        for handle in (self._metrics, self._log):
            if handle is not None and not handle.closed:
                handle.close()
        for fd in self._folders.values():
            os.close(fd)
        self._folders = {}
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def _open_trackers(self, tracking: Setup, resumed_at: int | None = None,
                       history: list[dict[str, Any]] | None = None) -> None:
        """The trackers, each on the same tracked run as before on a resume (meta.json keeps
        their ids). One that cannot open fails the run (status and reason in meta.json) before
        its first step."""
        opening = Opening(self.folder, tracking, self.meta,
                          (self.folder / layout.CONFIG).read_text(encoding="utf-8"),
                          self.folder / layout.TENSORBOARD, resumed_at, history or [],
                          {"kdl.run_id": self.id, **_sweep_tags(self.meta.get("sweep"))},
                          resume=self.resume_command)
        try:
            self.trackers = open_trackers(opening)
        except KdlError as exc:
            self.update_meta(status="failed", ended_at=utc_now(), error=str(exc))
            self.log(f"run failed: {exc}")
            raise
        states = {tracker.name: tracker.state() for tracker in self.trackers if tracker.state()}
        if states:  # a tracker left out at a resume keeps its run, should it come back later
            self.update_meta(trackers={**(self.meta.get("trackers") or {}), **states})

    def _tell_trackers(self, call: Callable[[Tracker], None]) -> None:
        """A tracker that fails here (its server gone, its disk full) is dropped, said in
        train.log and on stderr: where the metrics are copied to never ends a training run,
        and a resume sends what it missed (trackers.MlflowTracker._catch_up)."""
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # any library's failure, so broad on purpose
                self.trackers.remove(tracker)
                message = f"{tracker.name} failed and gets no more of this run: {type(exc).__name__}: {exc}"
                self.log(message)
                print(f"warning: {message}", file=sys.stderr, flush=True)

    def _keep_metrics_up_to(self, step: int) -> list[dict[str, Any]]:
        """Drop records written after the checkpoint being resumed from; the records kept."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        kept = [r for r in fsio.read_jsonl(self.folder / layout.METRICS) if r.get("step", 0) <= step]
        fsio.write_text(self.folder / layout.METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, which: str) -> Path:
        return self.folder / layout.CHECKPOINTS / f"{which}.pt"

    @_rank_zero
    def save_checkpoint(self, which: tuple[str, ...], state: dict[str, Any],
                        meta: dict[str, Any] | None = None) -> None:
        """Metrics flushed and the state copied now (checkpoint.captured); then, on a thread of
        its own while training goes on, the metrics fsynced, the state written by torch.save
        atomically once under each name, then meta.json updated with `meta` (what the
        checkpoint commits, never claimed before it is on disk). The next save and the end of
        training (Trainer.fit) wait for it, before any other write of meta.json: a full disk
        fails the run there."""
        self.wait_for_checkpoint()
        paths = [self.checkpoint(name) for name in which]
        with self._failing(paths[-1], self._kept):
            self.flush(sync=False)  # to the OS now (a kill loses none); to the disk in the thread
            folders = self._folder(paths[-1].parent), self._folder(self.folder)
        # the trackers' records so far are this checkpoint's: handed over once it is on disk
        self._tell_trackers(lambda tracker: tracker.checkpointing())
        checkpoint = captured(state)  # this step's state, whatever training does next
        if self._vocabulary is not None:
            checkpoint["vocabulary"] = self._vocabulary
        if meta is not None:
            self.meta.update(meta)
            meta_now = fsio.json_bytes(self.meta)  # as it is now: the thread writes it later
        # (its descriptor stays open while the thread works: metrics.jsonl is closed by `close`,
        # after the thread, and by a resume's _keep_metrics_up_to, before any checkpoint)
        metrics = None if self._metrics is None else self._metrics.fileno()

        def write() -> None:
            with self._failing(paths[-1], self._kept):
                if metrics is not None:  # the records up to the checkpoint, on disk before it
                    os.fsync(metrics)
                save_checkpoint(paths, checkpoint, folders[0])
            if meta is not None:
                with self._failing(self.folder / layout.META, "The checkpoint is written"):
                    fsio.atomic_write(self.folder / layout.META, meta_now, folder_fd=folders[1])

        self._saving.start(write)
        self._covering = True

    def _kept(self) -> str:
        """What a resume would start from, were this checkpoint not written: the previous
        last.pt (replaced atomically, so still whole), or (none yet) step 0."""
        return ("The previous checkpoint is intact" if self.checkpoint("last").is_file() else
                "No checkpoint was written yet, so the run will start again from step 0")

    def _folder(self, folder: Path) -> int:
        """A descriptor of `folder`, kept open until `close`: the checkpoint thread fsyncs it
        after each rename there without opening the folder each time."""
        if folder not in self._folders:
            self._folders[folder] = fsio.open_folder(folder)
        return self._folders[folder]

    @contextlib.contextmanager
    def _failing(self, path: Path, kept: str | Callable[[], str]) -> Iterator[None]:
        """An OSError (a full disk) as the run's failure, naming the file and what a resume
        starts from."""
        try:
            yield
        except OSError as exc:
            kept = kept() if callable(kept) else kept  # (what is on disk now, once it failed)
            raise RunFailed(
                f"could not write {path}: {exc.strerror or exc}. {kept}; free some space (or "
                f"fix the folder's permissions) and continue with `{self.resume_command}`."
            ) from None

    def wait_for_checkpoint(self) -> None:
        """Until the checkpoint being written is on disk; its error (RunFailed), if any. Then
        what it covers is what a resume keeps: the trackers that cannot drop a point get it."""
        covering, self._covering = self._covering, False
        self._saving.wait()
        if covering:  # (a checkpoint that failed hands nothing over)
            self._tell_trackers(lambda tracker: tracker.checkpointed())

    # ------------------------------------------------------------------ samples and eval

    @_rank_zero
    def write_sample(self, name: str, sample: Any, step: int | None = None) -> list[Path]:
        """A task's sample as samples/NAME.png (an image grid) or .txt, and each of its `more` as
        samples/NAME-KEY.png or .txt; also into TensorBoard at `step` while training. Returns the
        paths written, the sample's first."""
        folder = fsio.own_folder(self.folder / layout.SAMPLES)
        paths = []
        for key, part in sample_parts(sample):
            path = folder / f"{name}{'-' + key if key else ''}{sample_suffix(part)}"
            fsio.atomic_write(path, sample_bytes(part))
            paths.append(path)
            if step is not None:
                self.tensorboard(f"samples/{name.split('-')[0]}{'_' + key if key else ''}", part, step)
        return paths

    @_rank_zero
    def write_export(self, name: str, data: bytes) -> Path:
        """export/NAME: a model `kdl export` wrote (and checked)."""
        path = fsio.own_folder(self.folder / layout.EXPORT) / name
        fsio.atomic_write(path, data)
        return path

    @_rank_zero
    def write_eval(self, result: dict[str, Any]) -> Path:
        """eval/<checkpoint>-<split>-step<N>.json, one per checkpoint step evaluated (an eval of a
        run in progress is not replaced by a later one), eval/<checkpoint>-<split>.json, the
        latest, and the latest per split in summary.json (where `kdl runs`, `show` and `compare`
        read test.accuracy and the like)."""
        folder = fsio.own_folder(self.folder / layout.EVAL)
        stem = f"{result['checkpoint']}-{result['split']}"
        fsio.write_json(folder / f"{stem}-step{result['step']:07d}.json", result)
        path = folder / f"{stem}.json"
        fsio.write_json(path, result)
        summary = fsio.read_json(self.folder / layout.SUMMARY)
        scalars = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        summary["eval"] = {**(summary.get("eval") or {}), result["split"]: {
            **{k: result[k] for k in ("checkpoint", "epoch", "step", "evaluated_at")},
            "metrics": scalars}}
        fsio.write_json(self.folder / layout.SUMMARY, summary)
        return path


def sample_bytes(sample: Any) -> bytes:
    """A sample's file: an image grid's PNG, or the text in UTF-8."""
    return png_grid(sample.images) if sample.images is not None else sample.text.encode()


def sample_suffix(sample: Any) -> str:
    return ".png" if sample.images is not None else ".txt"


def sample_parts(sample: Any) -> list[tuple[str, Any]]:
    """(key, sample) of a sample ("") and of each of its `more` (by its key), each its own file."""
    return [("", sample), *sample.more.items()]


def _sweep_tags(sweep: dict[str, Any] | None) -> dict[str, str]:
    """kdl.sweep and kdl.trial of a run a sweep made (meta.json's sweep tag)."""
    if not sweep:
        return {}
    return {"kdl.sweep": str(sweep["id"]),
            **({"kdl.trial": str(sweep["trial"])} if "trial" in sweep else {})}

