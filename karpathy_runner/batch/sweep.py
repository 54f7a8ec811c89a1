"""`kdl sweep`: the Cartesian product of a grid, each point a normal `kdl train` process.

Points run one by one or N at a time as separate processes, so a point that crashes or is
killed takes nothing else with it; each is tagged with the sweep id and its point in meta.json.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from ..errors import KdlError, quoted
from . import forks

# exit codes of `kdl train`; killed by a signal (a second Ctrl-C) Popen says -SIGNAL
STATUS_BY_EXIT = {0: "completed", 1: "failed", 2: "bad config", 130: "interrupted", 143: "interrupted",
                  -signal.SIGINT: "interrupted", -signal.SIGTERM: "interrupted"}


def new_sweep_id() -> str:
    return f"sweep-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def lasting_sweep_id(name: str, config_hash: str, points: list[dict[str, Any]]) -> str:
    """The id of a sweep whose points are jobs: the same config and grid, the same id."""
    identity = json.dumps({"config": config_hash, "points": points}, sort_keys=True)
    return f"sweep-{name}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def split_values(text: str) -> list[str]:
    """Split `0.1,0.01` on commas outside brackets, so `[16,32],[32,64]` gives two lists."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts]


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """`--grid optimizer.lr=0.1,0.01` -> [('optimizer.lr', [0.1, 0.01])]; values read as YAML."""
    from ..config.loading import parse_override

    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise KdlError(f"--grid {quoted(item)} is malformed; write --grid key=v1,v2 e.g. "
                           "--grid seed=0,1,2")
        parsed = [parse_override(f"{key}={value}", "--grid")[1] for value in split_values(values)]
        if any(existing == key.strip() for existing, _ in grid):
            raise KdlError(f"--grid {key.strip()!r} is given twice; put all its values in one --grid")
        grid.append((key.strip(), parsed))
    if not grid:
        raise KdlError("kdl sweep needs at least one --grid key=v1,v2")
    return grid


def grid_points(grid: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    keys = [key for key, _ in grid]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in grid))]


def check_point(config: Path, base: list[str], point: dict[str, Any], option: str = "--grid") -> None:
    """The config of one point must validate; if not, the message points at `option`."""
    from ..config.loading import load_config
    from ..config.messages import FIX_HINT
    from ..errors import ConfigError

    try:
        load_config(config, base + point_sets(point))
    except ConfigError as exc:
        shown = ", ".join(f"{key}={yaml_value(value)}" for key, value in point.items())
        problems = "; ".join(problem.split(FIX_HINT)[0] for problem in exc.problems)
        raise KdlError(
            f"{option}: the point {shown} is not a valid config: {problems}. Fix {option} "
            f"{f', {option} '.join(point)}"
        ) from None


def plan_grid(config: Path, base: list[str], grid: list[str], runs_dir: Path | None,
              skip_existing: bool, lasting: bool = False) -> tuple[str, list[Point]]:
    """A grid sweep's id and points, every point's config checked before anything runs.
    `lasting`: the sweep outlives its command (its points are jobs), and its id comes from the
    config and the grid, so that the same command run again finds it."""
    from ..config.loading import load_config

    values = grid_points(parse_grid(grid))
    cfg = load_config(config, base)  # the config and its --set values first: their errors are theirs
    for point in values:  # then every point's, before anything runs: its errors are the grid's
        check_point(config, base, point)
    sweep_id = lasting_sweep_id(cfg.name, cfg.hash(), values) if lasting else new_sweep_id()
    return sweep_id, [
        Point(i, point, train_argv(str(config), base + point_sets(point), sweep_id,
                                   str(runs_dir) if runs_dir else None, skip_existing))
        for i, point in enumerate(values)
    ]


def point_sets(point: dict[str, Any]) -> list[str]:
    """A point as `key=value` overrides whose values read back as the same YAML."""
    return [f"{key}={yaml_value(value)}" for key, value in point.items()]


def shown(value: Any) -> str:
    """A value as a person reads it: floats to 4 significant digits, the rest as YAML."""
    return f"{value:.4g}" if isinstance(value, float) else yaml_value(value)


def yaml_value(value: Any) -> str:
    if isinstance(value, (list, dict)):  # compact JSON is YAML too, and has no spaces to quote
        return json.dumps(value, separators=(",", ":"))
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


@dataclass
class Point:
    index: int
    values: dict[str, Any]
    argv: list[str]
    status: str = "pending"
    exit_code: int | None = None
    run_id: str | None = None
    seconds: float = 0.0
    error: str = ""
    process: subprocess.Popen | forks.Forked | None = field(default=None, repr=False)
    files: tuple[IO[str], IO[str]] | None = field(default=None, repr=False)
    job: Any = field(default=None, repr=False)  # its submitit job (jobs.JobPool)
    started: float = 0.0
    name: str = ""  # shown in the log instead of its place in the list (a search's trial)

    def label(self) -> str:
        return " ".join(f"{k}={shown(v)}" for k, v in self.values.items())


def train_argv(config: str, sets: list[str], sweep_id: str, runs_dir: str | None,
               skip_existing: bool) -> list[str]:
    """The `kdl train` arguments of one point (without the program name)."""
    argv = ["train", config, *itertools.chain.from_iterable(("--set", s) for s in sets),
            "--sweep", sweep_id, "--quiet"]
    if runs_dir:
        argv += ["--runs-dir", runs_dir]
    if skip_existing:
        argv.append("--skip-existing")
    return argv


def emit(points: list[Point]) -> str:
    return "\n".join(shlex.join(["kdl", *p.argv]) for p in points)


class Sweep:
    """Runs points through a launcher, at most `jobs` at once: by default `Processes`, each a
    `python -m karpathy_runner train ...` process here (jobs.JobPool: each a submitit job).

    `more()` gives the next point when the list runs out (None: no more for now), as a search
    asks for its next trial; `finished(point)` hears of each point that ends (once it is logged)."""

    def __init__(self, points: list[Point], jobs: int, fail_fast: bool, log: Any,
                 more: Callable[[], Point | None] | None = None,
                 finished: Callable[[Point], None] | None = None, total: int | None = None,
                 launcher: Any = None):
        self.points = points
        self.jobs = max(jobs, 1)
        self.fail_fast = fail_fast
        self.log = log
        self.more = more or (lambda: None)
        self.finished = finished or (lambda point: None)
        self.total = total or len(points)
        self.launcher = launcher or Processes(self.jobs)
        self.owned = launcher is None  # closed at the end of run(); a given one is its giver's
        self.stopping = False

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.owned:
                self.launcher.close()

    def _run(self) -> int:
        pending = list(self.points)
        running: list[Point] = []
        try:
            while True:
                while len(running) < self.jobs and not self.stopping:
                    point = pending.pop(0) if pending else self._more()
                    if point is None:
                        break
                    with interrupt_after():  # a point started is in `running`, to be stopped
                        running.append(self._start(point))
                if not running:
                    break
                for point in [p for p in running if self.launcher.ended(p)]:
                    running.remove(point)
                    self._finish(point)
                    if point.status != "completed" and self.fail_fast and not self.stopping:
                        self._stop(running, signal.SIGTERM, "--fail-fast: stopping the sweep")
                time.sleep(self.launcher.poll_s)
        except KeyboardInterrupt:
            if self.launcher.detached:  # its jobs are not this command's to stop
                self.log(self.launcher.leave(running))
                return 130
            self._stop(running, signal.SIGINT, "interrupted: letting running points checkpoint "
                                               "(Ctrl-C again to stop them now)")
            self._wait(running)
            return 130
        for point in pending:
            point.status = "not run"
        return 0 if all(p.status == "completed" for p in self.points) else 1

    def _wait(self, running: list[Point]) -> None:
        """Wait for the stopped points; a second Ctrl-C passes on a second SIGINT, which stops
        them at once (they resume from their last checkpoint)."""
        try:
            for point in running:
                self.launcher.wait(point)
        except KeyboardInterrupt:
            self._stop(running, signal.SIGINT, "interrupted again: stopping the points now")
            for point in running:
                self.launcher.wait(point)
        for point in running:
            self._finish(point)

    def _more(self) -> Point | None:
        point = self.more()
        if point is not None:
            self.points.append(point)
        return point

    def _start(self, point: Point) -> Point:
        how = self.launcher.start(point)  # (for the first local point, the fork server's start too)
        point.started, point.status = time.time(), "running"
        self.log(f"{self._where(point)} {how}  {point.label()}")
        return point

    def _finish(self, point: Point) -> None:
        self.launcher.finish(point)
        point.seconds = time.time() - point.started
        self.log(f"{self._where(point)} {point.status:<10} {point.label()} -> "
                 f"{point.run_id or '-'} ({point.seconds:.1f}s)")
        if point.status != "completed" and point.error:
            self.log("    " + point.error.splitlines()[-1])
        self.finished(point)

    def _where(self, point: Point) -> str:
        return f"[{point.name}]" if point.name else f"[{point.index + 1}/{self.total}]"

    def _stop(self, running: list[Point], signum: int, why: str) -> None:
        self.stopping = True
        self.log(why)
        for point in running:
            self.launcher.stop(point, signum)


class Processes:
    """The local pool: each point a `kdl train` process on this machine, its output in temp
    files; each holds the `inherited` descriptors (a search's lock on its trials). On Linux the
    points are forked from a server that has imported torch already (forks.py), otherwise each
    is `python -m karpathy_runner train ...`, as they are should the server be gone."""

    detached = False  # a point's process stops with the sweep's command
    poll_s = 0.05

    def __init__(self, jobs: int, inherited: tuple[int, ...] = ()):
        self.jobs = jobs
        self.inherited = inherited
        self.forks: forks.Forks | None = None

    def start(self, point: Point) -> str:
        out = tempfile.TemporaryFile("w+")
        err = tempfile.TemporaryFile("w+")
        point.files = (out, err)
        if self.forks is None and forks.available():  # the first point waits for its imports
            self.forks = forks.Forks(self._environment())
        fds = [out.fileno(), err.fileno(), *self.inherited]
        forked = self.forks.start(point.argv, fds) if self.forks else None
        # in a session of its own: a Ctrl-C at the terminal reaches the sweep alone, which passes
        # one SIGINT on (two would stop a point at once, without its checkpoint)
        point.process = forked or subprocess.Popen(
            [sys.executable, "-m", "karpathy_runner", *point.argv],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
            env=self._environment(), pass_fds=self.inherited,
        )
        return "started"

    def close(self) -> None:
        """The points are done: the server ends."""
        if self.forks is not None:
            self.forks.close()
            self.forks = None

    def active(self, key: int) -> bool:
        """Is point `key` running already, started by an earlier command? Not as this pool
        knows: it knows only the processes it started."""
        return False

    def ended(self, point: Point) -> bool:
        return point.process.poll() is not None

    def finish(self, point: Point) -> None:
        out, err = point.files
        out.seek(0)
        err.seek(0)
        point.exit_code = point.process.returncode
        point.run_id, point.error = last_line(out.read()), err.read().strip()
        out.close()
        err.close()
        point.status = STATUS_BY_EXIT.get(point.exit_code, f"exit {point.exit_code}")
        if isinstance(point.process, forks.Forked) and not point.process.heard:
            point.exit_code, point.status = None, status_of_run(point)

    def stop(self, point: Point, signum: int) -> None:
        if point.process.poll() is None:
            point.process.send_signal(signum)

    def wait(self, point: Point) -> None:
        point.process.wait()

    def _environment(self) -> dict[str, str]:
        """The points' environment: with several at once and no OMP_NUM_THREADS of the user's,
        each gets its share of the CPU cores for torch's threads (torch takes them all by
        default, and points spinning on each other's cores run several times slower)."""
        environment = dict(os.environ)
        if self.jobs > 1 and "OMP_NUM_THREADS" not in environment:
            environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return environment


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """A Ctrl-C during the block raises KeyboardInterrupt at its end, not in its middle: a point
    whose process had started but whose start was not yet recorded would train on unseen. Where
    a Ctrl-C raises none (off the main thread, or SIGINT ignored: a script's background job), it
    does nothing."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    heard: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if heard:
            raise KeyboardInterrupt


# a run's status as the point's: its kdl train exited 0, 130 or 143 (interrupted), or 1
RUN_ENDS = {"completed": "completed", "paused": "completed", "pruned": "completed",
            "interrupted": "interrupted"}


def status_of_run(point: Point) -> str:
    """The status of a point whose exit code no one heard (its fork server was killed before it
    ended), as its run folder has it: what its kdl train wrote there as it ended (a run still
    `running` is `crashed`: killed). Without a run, or with another status, it failed."""
    from ..runfolder.layout import runs_dir
    from ..runfolder.reader import Run

    argv = point.argv
    root = runs_dir(argv[argv.index("--runs-dir") + 1] if "--runs-dir" in argv else None)
    if not point.run_id or point.run_id != Path(point.run_id).name or not (root / point.run_id).is_dir():
        return "failed"
    return RUN_ENDS.get(Run(root / point.run_id).status, "failed")


def last_line(text: str) -> str | None:
    """The last line `kdl train` printed on stdout: its run id (None: it printed none)."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else None


def results(points: list[Point], runs_dir: Path) -> list[dict[str, Any]]:
    """One record per point, with the best metric read from its run folder."""
    from ..runfolder.reader import Run

    rows = []
    for point in points:
        best = {}
        if point.run_id and (runs_dir / point.run_id).is_dir():
            best = Run(runs_dir / point.run_id).meta.get("best") or {}
        rows.append({"index": point.index, "point": point.values, "status": point.status,
                     "exit_code": point.exit_code, "run": point.run_id,
                     "best_metric": best.get("metric"), "best_value": best.get("value"),
                     "seconds": round(point.seconds, 2)})
    return rows


def to_json(sweep_id: str, rows: list[dict[str, Any]]) -> str:
    return json.dumps({"sweep": sweep_id, "points": rows})


def print_summary(rows: list[dict[str, Any]]) -> None:
    """The end-of-sweep table, on stderr (stdout keeps just the sweep id for scripts)."""
    from rich.console import Console
    from rich.table import Table

    keys = list(rows[0]["point"]) if rows else []
    table = Table(show_edge=False, header_style="bold")
    for column in [*keys, "status", "run", "best", "seconds"]:
        table.add_column(column)
    for row in rows:
        best = "-" if row["best_value"] is None else f"{row['best_metric']} {row['best_value']:.4g}"
        style = None if row["status"] == "completed" else "red"
        table.add_row(*(str(row["point"][k]) for k in keys), row["status"], row["run"] or "-",
                      best, f"{row['seconds']:.1f}", style=style)
    width = None if sys.stderr.isatty() else 200  # piped into a log: never fold the run ids
    Console(stderr=True, highlight=False, width=width).print(table)
