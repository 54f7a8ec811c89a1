"""Points as submitit jobs (`kdl sweep --launcher slurm|submitit-local`).

A job runs its point's `kdl train` command, the one the local pool runs, as a child process
(`TrainJob`), and leaves kdl's exit code, run id and last error line beside submitit's files
(`<job id>_kdl.json`). `JobPool` is the sweep's launcher for jobs: it submits a point, or waits
for the job an earlier command submitted for it while that job is queued or running, and reads
each job's end. Every job is recorded in the sweep's folder (runfolder/sweeps.py), so the same
command run again, or with `--status`, finds them.

A job's state is Slurm's word for it (sacct, through submitit); a submitit-local job has the same
words: RUNNING while its process lives, then COMPLETED or FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KdlError
from ..runfolder import fsio, locks, sweeps
from ..runfolder.layout import process_running, process_start_time
from ..runfolder.reader import Run, iter_runs
from .launch import INSTALL, Launcher, executor
from .sweep import STATUS_BY_EXIT, Point, Sweep, last_line, point_sets, shown

# Slurm's states of a job not yet ended (UNKNOWN: sacct has no word of it yet, as just after
# sbatch); any other state (COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL,
# OUT_OF_MEMORY, ...) is an end
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                    "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "UNKNOWN"})
OUTCOME = "{job}_kdl.json"  # in the jobs folder: kdl train's end, written by the job
CONTROLLERS = "controllers.log"  # in the jobs folder: what submitit-local's controllers print


class TrainFailed(Exception):
    """kdl train ended with another exit code than 0: the job fails, as Slurm counts it."""


class TrainJob:
    """What a point's job runs: `python -m karpathy_runner ARGV`, the point's `kdl train`.

    Slurm signals every process of a job: SIGTERM to stop it (preemption, scancel, the time
    limit) and submitit's SIGUSR2 shortly before the time limit. `kdl train` stops with a
    checkpoint on SIGTERM, but would die of SIGUSR2; so it starts with SIGUSR2 blocked, and this
    process passes each stop on to it as one SIGTERM. The run then ends `interrupted` and the
    sweep's next command resubmits it, to resume from its checkpoint."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> str | None:
        import submitit

        stops: list[int] = []
        warning = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
        for signum in (signal.SIGINT, signal.SIGTERM, warning):  # recorded; the loop below acts
            signal.signal(signum, lambda signum, frame: stops.append(signum))
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {warning})  # the child inherits it
            try:
                child = subprocess.Popen([sys.executable, "-m", "karpathy_runner", *self.argv],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            passed = False
            while child.poll() is None:
                if stops and not passed:  # once: kdl train's first stop is the one it obeys
                    child.send_signal(signal.SIGTERM)
                    passed = True
                time.sleep(0.2)
            out.seek(0)
            err.seek(0)
            run, errors = last_line(out.read()), err.read()
        sys.stderr.write(errors)  # into the job's log
        error = last_line(errors) or ""
        paths = submitit.JobEnvironment().paths
        fsio.write_json(paths.folder / OUTCOME.format(job=paths.job_id),
                        {"exit_code": child.returncode, "run": run, "error": error})
        if child.returncode != 0:
            raise TrainFailed(f"kdl train exited with {child.returncode}: {error}")
        return run


def _submitit() -> Any:
    """submitit, its log kept off this process's stdout (submitit logs there, and kdl's results
    go there); kdl reports the jobs' states itself."""
    try:
        import submitit
    except ImportError:
        raise KdlError(f"this sweep's jobs were submitted through submitit, which is not "
                       f"installed here: {INSTALL}") from None
    logging.getLogger("submitit").setLevel(logging.CRITICAL + 1)
    return submitit


@dataclass
class JobView:
    """A job of a sweep as kdl reads it: its state, and how its `kdl train` ended."""

    job: Any  # submitit's Job
    record: dict[str, Any]  # the sweep's record of it: key, point, job id, launcher

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def outcome(self) -> dict[str, Any] | None:
        """kdl train's exit code, run id and last error line, once the job wrote them."""
        found = fsio.read_json(self.job.paths.folder / OUTCOME.format(job=self.job_id))
        return found if type(found.get("exit_code")) is int else None

    def state(self) -> str:
        if self.record.get("launcher") == "slurm":
            word = (self.job.state or "UNKNOWN").split()[0].upper()  # "CANCELLED by 1234"
            if word not in ACTIVE or not self.job.paths.result_pickle.exists():
                return word
        elif self._running():
            return "RUNNING"
        # ended: sacct may lag behind the job's last moment; a local job has only this word
        outcome = self.outcome()
        return "COMPLETED" if outcome and outcome["exit_code"] == 0 else "FAILED"

    def ended(self) -> bool:
        return self.state() not in ACTIVE

    def known_active(self) -> bool:
        """Queued or running as far as the launcher knows: a job of an earlier command that
        sacct has no word of (its accounting forgot it) is not waited for, but submitted again."""
        return self.state() in ACTIVE - {"UNKNOWN"}

    def _running(self) -> bool:
        """Is this submitit-local job's process alive? Its job id is the process's pid; a job
        of an earlier command is looked up by it (and by its start time: pids are reused)."""
        state = self.job.state
        if state != "NO PROCESS AND NO RESULT":  # submitted by this process: it knows
            return state == "RUNNING"
        return self.job_id.isdigit() and process_running(int(self.job_id), self.record.get("pid_started"))


def recorded(root: Path, sweep_id: str) -> dict[int, JobView]:
    """The latest job of each point of the sweep (by key: grid index or trial number)."""
    records = {r["key"]: r for r in sweeps.recorded_jobs(root, sweep_id)}
    if not records:
        return {}
    submitit = _submitit()
    kinds = {"slurm": submitit.SlurmJob, "submitit-local": submitit.LocalJob}
    folder = root / sweeps.SWEEPS / sweep_id / sweeps.JOBS
    return {key: JobView(kinds.get(r.get("launcher"), submitit.SlurmJob)(folder, r["job"]), r)
            for key, r in records.items()}


class JobPool:
    """The sweep's launcher for jobs (sweep.Processes is the one for processes here).

    A point is submitted unless the job an earlier command submitted for it is still queued or
    running: that one is waited for instead. A job that ended (completed or not) is never
    waited for again: the point is submitted afresh, and its `kdl train` resumes or skips the
    run as the point's command says."""

    detached = True  # the jobs go on when the command stops

    def __init__(self, launcher: Launcher, root: Path, sweep_id: str,
                 run_of: Callable[[Point], str | None] = lambda point: None):
        self.launcher, self.root, self.sweep_id = launcher, root, sweep_id
        # a look at each running job's files; on a cluster's shared file system once a second
        # (submitit asks sacct at most every few seconds anyway)
        self.poll_s = 1.0 if launcher.name == "slurm" else 0.2
        self.executor = executor(launcher, sweeps.jobs_folder(root, sweep_id), f"kdl-{sweep_id}")
        _submitit()
        self.earlier = recorded(root, sweep_id)
        self.run_of = run_of

    def leave(self, running: list[Point]) -> str:
        """A Ctrl-C of the command: what becomes of the running points' jobs. Slurm's go on;
        submitit-local's are this terminal's processes, and stop with it, with a checkpoint."""
        if self.launcher.name == "slurm":
            for point in running:
                point.status = "submitted"
            return ("interrupted: the jobs go on in Slurm without this command; --status shows "
                    "them, and the same command run again waits for them")
        for point in running:
            point.status = "interrupted"
        return ("interrupted: the Ctrl-C stopped the jobs too, each with a checkpoint; the same "
                "command run again resumes them")

    def close(self) -> None:
        """The command is done with its jobs; they are the scheduler's."""

    def active(self, key: int) -> bool:
        """Is point `key`'s job from an earlier command still queued or running?"""
        view = self.earlier.get(key)
        return view is not None and view.known_active()

    def start(self, point: Point) -> str:
        view = self.earlier.pop(point.index, None)
        if view is not None and view.known_active():
            point.job = view
            return f"waiting for job {view.job_id} ({view.state()}), submitted before"
        with _controller_output(self.launcher, self.executor.folder):
            job = self.executor.submit(TrainJob(self.argv(point)))
        record = {"key": point.index, "point": point.values, "job": str(job.job_id),
                  "launcher": self.launcher.name}
        if self.launcher.name == "submitit-local":  # its id is a pid: a later command checks it
            record["pid_started"] = process_start_time(int(job.job_id))
        sweeps.record_job(self.root, self.sweep_id, record)
        point.job = JobView(job, record)
        return f"submitted job {job.job_id}"

    def argv(self, point: Point) -> list[str]:
        """The point's `kdl train` in its job; a job of several GPUs trains it over all of them,
        one process each (`--nproc-per-node`: torchrun, DistributedDataParallel), one run."""
        gpus = self.launcher.gpus or 0
        return [*point.argv, "--nproc-per-node", str(gpus)] if gpus > 1 else point.argv

    def ended(self, point: Point) -> bool:
        return point.job.ended()

    def finish(self, point: Point) -> None:
        """The point's end as its `kdl train` gave it; a job that ended before kdl train did
        (cancelled, preempted, out of time or memory) takes the job's state."""
        view: JobView = point.job
        outcome = view.outcome()
        if outcome is not None:
            point.exit_code, point.run_id, point.error = (outcome["exit_code"], outcome.get("run"),
                                                          outcome.get("error") or "")
            point.status = STATUS_BY_EXIT.get(point.exit_code, f"exit {point.exit_code}")
            return
        state = view.state()
        point.status, point.run_id = state.lower(), self.run_of(point)
        point.error = (f"job {view.job_id} ended {state} before kdl train did; its log: "
                       f"{view.job.paths.stderr}")

    def stop(self, point: Point, signum: int) -> None:
        """--fail-fast: cancel the job (Slurm stops it with SIGTERM: it checkpoints)."""
        point.job.job.cancel(check=False)


@contextlib.contextmanager
def _controller_output(launcher: Launcher, folder: Path) -> Iterator[None]:
    """submitit-local starts a controller process per job, which writes on this process's
    stdout and stderr, where kdl's results and log go (a Ctrl-C at the terminal reaches it too,
    and it prints a traceback): it is started with them in `folder`/controllers.log instead."""
    if launcher.name != "submitit-local":
        yield
        return
    log = os.open(folder / CONTROLLERS, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                  | os.O_CLOEXEC, 0o644)
    saved = (os.dup(1), os.dup(2))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)


# ----------------------------------------------------------------------------- grids


def config_hashes(config: Path, base: list[str], points: list[Point]) -> list[str]:
    """Each point's config hash: what `kdl train --skip-existing` finds its run by."""
    from ..config.loading import load_config

    return [load_config(config, base + point_sets(p.values)).hash() for p in points]


def runs_by_config(root: Path) -> dict[str, Run]:
    """The newest run of each config hash, damaged runs aside; a completed one wins over a
    newer failed one, as `--skip-existing` takes it."""
    found: dict[str, Run] = {}
    for run in sorted(iter_runs(root), key=lambda r: r.id):
        wanted = run.meta.get("config_hash")
        if run.status != "damaged" and isinstance(wanted, str) and not (
                run.status == "failed" and wanted in found and found[wanted].status == "completed"):
            found[wanted] = run
    return found


def run_grid(points: list[Point], hashes: list[str], sweep_id: str, root: Path,
             launcher: Launcher, jobs: int | None, fail_fast: bool,
             log: Callable[[str], None]) -> int:
    """Submit the grid's points as jobs, every point whose run is not completed (those are
    taken as they are), and wait for them; one command drives a sweep at a time."""
    with locks.RunLock(sweeps.sweep_folder(root, sweep_id), what=f"sweep {sweep_id}").acquire():
        runs = runs_by_config(root)
        todo = []
        for point, wanted in zip(points, hashes, strict=True):
            run = runs.get(wanted)
            if run is None or run.status != "completed":
                todo.append(point)
                continue
            point.status, point.run_id = "completed", run.id
            log(f"[{point.index + 1}/{len(points)}] completed  {point.label()} -> {run.id} (before)")
            if (run.meta.get("sweep") or {}).get("id") != sweep_id:  # made by another sweep
                sweeps.record(root, sweep_id, run.id, point.values, "reused")
        if not todo:
            return 0
        hash_of = {p.index: wanted for p, wanted in zip(points, hashes, strict=True)}
        pool = JobPool(launcher, root, sweep_id, run_of=lambda p: _run_id(root, hash_of[p.index]))
        return Sweep(todo, jobs or len(todo), fail_fast, log, total=len(points), launcher=pool).run()


def _run_id(root: Path, config_hash: str) -> str | None:
    run = runs_by_config(root).get(config_hash)
    return run.id if run else None


# ----------------------------------------------------------------------------- --status


def grid_status(points: list[Point], hashes: list[str], sweep_id: str, root: Path) -> list[dict]:
    """Each point of the grid: its latest job, the job's state, its run and the run's status."""
    views, runs = recorded(root, sweep_id), runs_by_config(root)
    return [_row({"index": p.index}, p.values, views.get(p.index), runs.get(wanted))
            for p, wanted in zip(points, hashes, strict=True)]


def trial_status(study: str, root: Path) -> list[dict]:
    """Each trial of a search that ran as a job: its latest job, its state, its run."""
    runs = {}
    for run in iter_runs(root):
        tag = run.meta.get("sweep")
        if isinstance(tag, dict) and tag.get("id") == study and type(tag.get("trial")) is int:
            runs[tag["trial"]] = run
    return [_row({"trial": key}, view.record.get("point") or {}, view, runs.get(key))
            for key, view in sorted(recorded(root, study).items())]


def _row(first: dict[str, Any], point: dict[str, Any], view: JobView | None,
         run: Run | None) -> dict[str, Any]:
    return {**first, "point": point, "job": view.job_id if view else None,
            "launcher": view.record.get("launcher") if view else None,
            "state": view.state() if view else "not submitted",
            "run": run.id if run else None, "status": run.status if run else None}


def print_status(rows: list[dict[str, Any]], keys: Iterable[str]) -> None:
    """The table of a sweep's jobs, on stdout (it is what `--status` asked for)."""
    from rich.console import Console
    from rich.table import Table

    keys = list(keys)
    first = "trial" if rows and "trial" in rows[0] else "point"
    table = Table(show_edge=False, header_style="bold")
    for column in [first, *keys, "job", "state", "run", "status"]:
        table.add_column(column)
    for row in rows:
        ended_short = row["status"] != "completed" and row["state"] not in ACTIVE
        style = "red" if ended_short else None
        number = row["trial"] if first == "trial" else row["index"] + 1
        table.add_row(str(number), *(shown(row["point"][k]) if k in row["point"] else "-" for k in keys),
                      row["job"] or "-", row["state"], row["run"] or "-", row["status"] or "-",
                      style=style)
    width = None if sys.stdout.isatty() else 200  # into a file or a pipe: never fold the run ids
    Console(highlight=False, width=width).print(table)
