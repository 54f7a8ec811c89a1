"""Reading run folders: one run (`Run`, read lazily, damage noted instead of raised), finding
runs by id, prefix, path or `latest`, and what a run's files say about its status."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..dotted import dotted_get
from ..errors import KdlError, quoted
from .fsio import is_record, read_bytes, read_object, read_records
from .layout import (
    CHECKPOINTS,
    CONFIG,
    META,
    METRICS,
    SUMMARY,
    VOCAB,
    beating,
    host_name,
    process_running,
    run_ref,
)
from .sweeps import pruned

# the types of the meta.json and summary.json keys that readers use; a key of another type is
# damage, dropped so that no reader meets it
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "name": str, "status": str, "model": str, "dataset": str, "task": str,
    "created_at": str, "host": str, "pid": int, "heartbeat_s": (int, float), "epochs": int,
    "epochs_done": int, "step": int, "duration_s": (int, float), "best": dict, "sweep": dict,
    "versions": dict, "metric_modes": dict, "resumes": list, "command": list,
}
SUMMARY_TYPES: dict[str, type | tuple[type, ...]] = {"final": dict, "best": dict}
PID_MAX = 2**31 - 1  # a process id is a positive pid_t
GLANCE = 4096  # bytes read from each end of metrics.jsonl, and from config.yaml's start, by a glance
YAML_KEY = re.compile(r"^[A-Za-z_][\w.-]*\s*:")
RUN_ID = re.compile(r"\d{8}-\d{6}-.+-[0-9a-f]{6}")  # layout.new_run_id's shape


class Run:
    """A run folder, read lazily. A damaged file (not JSON, not an object, binary, keys of the
    wrong type) reads as empty and is noted in `damage`: no reader ever raises on a run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.id = self.path.name
        self._meta: dict[str, Any] | None = None
        self._summary: dict[str, Any] | None = None
        self.problems: dict[str, str] = {}  # file name -> what is wrong with it
        self._glanced = False

    def _object(self, name: str, types: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
        value, problem = read_object(self.path / name)
        wrong = [key for key, kind in types.items()
                 if value.get(key) is not None and (not isinstance(value[key], kind)
                                                   or isinstance(value[key], bool))]
        if wrong:
            problem = f"{wrong[0]!r} is {value[wrong[0]]!r}, not {_type_name(types[wrong[0]])}"
            value = {k: v for k, v in value.items() if k not in wrong}
        if problem:
            self.problems[name] = problem
        return value

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = self._object(META, META_TYPES)
            pid = self._meta.get("pid")
            if pid is not None and not 0 < pid <= PID_MAX:  # -1 or 0 would signal a group
                self.problems.setdefault(META, f"'pid' is {quoted(pid)}, not a process id")
                del self._meta["pid"]
        return self._meta

    @property
    def damage(self) -> str | None:
        """What is wrong with the files read so far (meta.json always, and a glance at
        config.yaml and metrics.jsonl), or None."""
        _ = self.meta
        if not self._glanced:
            self._glanced = True
            self._glance()
        return "; ".join(f"{name} {problem}" for name, problem in self.problems.items()) or None

    def _glance(self) -> None:
        """A cheap look at config.yaml and metrics.jsonl, for listings of many runs: a short read
        of config.yaml's start (UTF-8 text whose first line is a key) and of metrics.jsonl's first
        and last complete lines (records). Damage between them shows when the whole file is read."""
        try:
            start = read_bytes(self.path / CONFIG, GLANCE)
        except FileNotFoundError:
            start = None
        except OSError as exc:
            self.problems.setdefault(CONFIG, f"cannot be read ({exc.strerror})")
            start = None
        if start is not None:
            if b"\x00" in start or not _utf8(start, cut=len(start) == GLANCE):
                self.problems.setdefault(CONFIG, "is not UTF-8 text")
            else:
                lines = [line for line in start.decode("utf-8", errors="ignore").splitlines()
                         if line.strip() and not line.startswith("#")]
                if not lines or not YAML_KEY.match(lines[0]):
                    self.problems.setdefault(CONFIG, "is not a mapping of config keys")
        try:
            path = self.path / METRICS
            size = os.stat(path).st_size
            head = read_bytes(path, GLANCE)
            tail = head if size <= GLANCE else read_bytes(path, GLANCE, size - GLANCE)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problems.setdefault(METRICS, f"cannot be read ({exc.strerror})")
            return
        # complete lines only: the first ends within the head; the tail's first piece may be cut
        first = head.split(b"\n", 1)[0] if b"\n" in head else None
        pieces = tail.split(b"\n")[:-1]  # what follows the last newline: a line a kill cut short
        last = pieces[-1] if pieces and (size <= GLANCE or len(pieces) > 1) else None
        if (b"\n" not in head and size > GLANCE) or any(
                line is not None and line.strip() and not _is_record_line(line) for line in (first, last)):
            self.problems.setdefault(METRICS, "has lines that are not metric records "
                                              "(binary, not JSON, or without step, epoch and split)")

    @property
    def status(self) -> str:
        """meta's status, except that a 'running' run whose process is gone is 'crashed', a run
        whose files are damaged is 'damaged', and a search's trial that its halving stopped
        (paused where the search recorded it pruned) is 'pruned'."""
        status = self.meta.get("status", "unknown")
        if self.damage:
            return "damaged"
        if status == "running" and not _process_alive(self.meta, self.path):
            return "crashed"
        if status == "paused" and self._pruned():
            return "pruned"
        return status

    @property
    def process(self) -> str:
        """The run's process as messages name it: "pid N", and " on HOST" if another machine's."""
        host = self.meta.get("host")
        return f"pid {self.meta.get('pid')}" + (f" on {host}" if host and host != host_name() else "")

    def _pruned(self) -> bool:
        tag = self.meta.get("sweep")
        if not isinstance(tag, dict) or not isinstance(tag.get("id"), str) or "trial" not in tag:
            return False
        at = pruned(self.path.parent, tag["id"]).get(self.id)
        return at is not None and at == self.meta.get("epochs_done")

    def config_dict(self) -> dict[str, Any]:
        """config.yaml as a dict ({} if damaged, noted in `damage`)."""
        from ..config.safe_yaml import UnsafeYaml, parse

        try:
            raw = parse(read_bytes(self.path / CONFIG).decode("utf-8"))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self.problems[CONFIG] = f"cannot be read ({exc.strerror})"
            return {}
        except UnicodeDecodeError:
            self.problems[CONFIG] = "is not UTF-8 text"
            return {}
        except UnsafeYaml as exc:
            self.problems[CONFIG] = str(exc)
            return {}
        if not isinstance(raw, dict):
            self.problems[CONFIG] = f"holds a {type(raw).__name__}, not a mapping"
            return {}
        return raw

    def metrics(self) -> list[dict[str, Any]]:
        records, bad = read_records(self.path / METRICS)
        if bad:
            self.problems[METRICS] = (f"has {bad} line(s) that are not metric records "
                                      "(binary, not JSON, or without step, epoch and split)")
        return records

    def summary(self) -> dict[str, Any]:
        if self._summary is None:
            self._summary = self._object(SUMMARY, SUMMARY_TYPES)
        return self._summary

    def duration(self) -> float | None:
        """Seconds trained: meta's total, plus, for a run still going, the time since it last
        started or resumed."""
        meta = self.meta
        done = meta.get("duration_s")
        if self.status != "running":
            return done
        resumes = meta.get("resumes") or [{}]
        since = _parse_utc(resumes[-1].get("at") or meta.get("started_at"))
        if since is None:
            return done
        return (done or 0.0) + max(0.0, (dt.datetime.now(dt.timezone.utc) - since).total_seconds())


    def vocabulary(self) -> list[str] | None:
        """The run's saved vocabulary (text and character data), or None."""
        try:
            tokens = json.loads(read_bytes(self.path / VOCAB).decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        return tokens if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else None

    def checkpoint(self, which: str) -> Path:
        return self.path / CHECKPOINTS / f"{which}.pt"


def _utf8(data: bytes, cut: bool) -> bool:
    """Is `data` UTF-8 (allowing, when it was `cut` from a longer file, a character cut short)?"""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return cut and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data"
    return True


def _is_record_line(line: bytes) -> bool:
    try:
        return is_record(json.loads(line.decode("utf-8")))
    except (ValueError, RecursionError):
        return False


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return "a number"
    return {"int": "an integer", "str": "a string", "dict": "a mapping"}.get(kind.__name__, "a list")


def refuse_damaged(run: Run) -> None:
    """`kdl eval`, `sample` and `train --resume` work only on a run whose files all read (its
    config.yaml is read strictly by the config loader, which says what is wrong with it)."""
    run.summary()
    run.metrics()
    if run.damage:
        raise KdlError(
            f"run {run.id} is damaged: {run.damage}. kdl will not evaluate or resume it; inspect "
            f"or restore the file in {run.path}, or remove the run with `kdl rm {run_ref(run.path)}`."
        )



def final_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary's final metrics (train.*, val.*) and its latest test-split eval's (test.*)."""
    test = ((summary.get("eval") or {}).get("test") or {}).get("metrics") or {}
    return {**(summary.get("final") or {}), **{f"test.{k}": v for k, v in test.items()}}


def _parse_utc(stamp: Any) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _process_alive(meta: dict[str, Any], folder: Path) -> bool:
    pid = meta.get("pid")
    if not pid:
        return True
    if meta.get("host") != host_name():  # another machine's process: its heartbeat tells
        return beating(folder, meta)
    return process_running(int(pid), meta.get("pid_started"))


def iter_runs(root: Path) -> Iterator[Run]:
    if not root.is_dir():
        return
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        # a symlink is not a run of this folder (it points elsewhere; `kdl rm` would follow it)
        if (not entry.is_symlink() and entry.is_dir()
                and os.path.exists(os.path.join(entry.path, META))):
            yield Run(Path(entry.path))


def resolve_run(root: Path, ref: str) -> Run:
    """A run id, a unique prefix of one, `latest`, the path of a real run folder, or the name of
    exactly one run (its config's `name`, `kdl train --name`)."""
    if not ref:
        raise KdlError("no run given; pass a run id, a unique prefix, a run folder or 'latest'")
    if ref == "latest":
        runs = list(iter_runs(root))
        if not runs:
            raise KdlError(f"no runs in {root}; train one with `kdl train CONFIG`")
        return max(runs, key=lambda r: (r.meta.get("created_at", ""), r.id))
    if "/" in ref or os.sep in ref or ref in (".", ".."):
        folder = Path(ref)
        if (folder / META).is_file() and (folder / CONFIG).is_file():
            return Run(folder.resolve())
        raise KdlError(
            f"{ref!r} is not a run folder (no {META} and {CONFIG} there). Pass a run id from "
            f"`kdl runs` or the path of a run folder."
        )
    exact = root / ref
    if (exact / META).is_file() and not exact.is_symlink():
        return Run(exact)
    runs = list(iter_runs(root))
    matches = [run for run in runs if run.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(run.id for run in matches[:5])
        raise KdlError(f"run prefix {ref!r} is ambiguous in {root}: it matches {shown}; give more "
                       "of the id")
    named = [run for run in runs if run.meta.get("name") == ref]
    if len(named) == 1:
        return named[0]
    if named:
        shown = ", ".join(run.id for run in named[:5]) + (", ..." if len(named) > 5 else "")
        raise KdlError(f"{len(named)} runs in {root} are named {ref!r}: {shown}; give one's id (or "
                       "a unique prefix of it)")
    raise KdlError(
        f"no run {ref!r} in {root}. List runs with `kdl runs` (or choose the folder with "
        "--runs-dir / KDL_RUNS_DIR)."
    )


def not_removable(run: Run, root: Path) -> str | None:
    """Why `kdl rm` must not delete `run`'s folder, or None: it removes only a kdl run, a real
    folder directly inside the runs folder, named as kdl names runs, whose meta.json (when it
    can be read at all: a damaged run is removable) gives that id."""
    if run.path.is_symlink():
        return "is a symbolic link"
    if run.path.resolve().parent != root.resolve():
        return f"is not inside the runs folder {root}"
    if not RUN_ID.fullmatch(run.id):
        return "is not named as kdl names runs (DATE-TIME-NAME-XXXXXX)"
    said = run.meta.get("id")
    if META not in run.problems and said != run.id:
        return (f"has a {META} that names another run ({quoted(said)})" if said else
                f"has a {META} that is not a kdl run's (no id)")
    return None


def resolve_runs(root: Path, refs: list[str]) -> list[Run]:
    """Several run references, each resolved like `resolve_run`; a run named twice counts once."""
    found: dict[Path, Run] = {}
    for ref in refs:
        run = resolve_run(root, ref)
        found.setdefault(run.path.resolve(), run)
    return list(found.values())


# ----------------------------------------------------------------------------- what a run says


def sweep_id(run: Run) -> str | None:
    sweep = run.meta.get("sweep")
    return sweep.get("id") if isinstance(sweep, dict) else None


def trial_place(run: Run) -> dict[str, Any]:
    """A search trial's number, and with successive halving the rung it stopped at and its
    epochs so far; {} for a run that is no trial."""
    tag = run.meta.get("sweep")
    if not isinstance(tag, dict) or not isinstance(tag.get("trial"), int):
        return {}
    place = {"trial": tag["trial"]}
    rungs = tag.get("rungs")
    if isinstance(rungs, list) and all(isinstance(r, int) for r in rungs):
        epochs = run.meta.get("epochs_done") if isinstance(run.meta.get("epochs_done"), int) else 0
        place.update(rung=rung_of(rungs, epochs), epochs=f"{epochs}/{rungs[-1]}")
    return place


def rung_of(rungs: list[int], epochs: int) -> int:
    """The rung (from 1) a trial has reached: the last whose epochs it has trained; 0 if none."""
    return max([i + 1 for i, r in enumerate(rungs) if r <= epochs], default=0)


def metric_mode(run: Run, metric: str) -> str | None:
    """Which way `metric` (split.name or name) is better, "min" or "max", as the run's task
    declared it in meta.json; None when the run does not say (kdl never guesses from a name)."""
    modes = run.meta.get("metric_modes")
    mode = modes.get(metric.split(".", 1)[-1]) if isinstance(modes, dict) else None
    return mode if mode in ("min", "max") else None


def best_mode(run: Run) -> str | None:
    """The direction the run judged its best metric by (recorded, else declared)."""
    best = run.meta.get("best") or run.summary().get("best") or {}
    if best.get("mode") in ("min", "max"):
        return best["mode"]
    return metric_mode(run, best_metric_name(run))


def current_best(run: Run) -> dict[str, Any]:
    """The run's best metric, value and epoch as they stand: meta.json's while it trains (each
    checkpoint updates it; a resumed run's summary.json is still its previous end's), else
    summary.json's, else meta.json's."""
    meta_best = run.meta.get("best")
    if run.status == "running" and isinstance(meta_best, dict):
        return meta_best
    return run.summary().get("best") or meta_best or {}


def best_metric_name(run: Run) -> str:
    """The metric a run is judged by (its train.best_metric, e.g. val.loss); for a run without
    one (a GAN's), its task's first declared metric in training (train.d_loss)."""
    best = run.meta.get("best") or run.summary().get("best") or {}
    if best.get("metric"):
        return best["metric"]
    configured = dotted_get(run.config_dict(), "train.best_metric")
    if isinstance(configured, str):
        return configured
    declared = list(run.meta.get("metric_modes") or {})
    return f"train.{declared[0]}" if declared else "val.loss"

