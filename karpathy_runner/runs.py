"""The run-folder contract: layout, atomic files, create, find, list, read, status.

Writing a run's files is writer.RunWriter's job; selecting, sorting and comparing many runs is
compare.py's. Imports nothing heavy (no torch, no pydantic) so that `kdl runs` and `kdl show`
start fast.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import KdlError

DEFAULT_RUNS_DIR = "runs"
STATUSES = ("running", "completed", "failed", "interrupted", "crashed")

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
VOCAB = "vocab.json"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
SAMPLES = "samples"
TENSORBOARD = "tb"


def runs_dir(option: str | Path | None = None) -> Path:
    """--runs-dir, else $KDL_RUNS_DIR, else ./runs."""
    return Path(option or os.environ.get("KDL_RUNS_DIR") or DEFAULT_RUNS_DIR)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- atomic files


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through `write(handle)` into a temp file beside `path`, fsync, rename over it."""
    import tempfile  # here, not at the top: `kdl --help` and `kdl runs` never write

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600: teammates could not read the run
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _new_file_mode() -> int:
    """The mode open() gives a new file under the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(data))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a truncated last line (a kill mid-write) is skipped."""
    records = []
    try:
        text = Path(path).read_text()
    except OSError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ----------------------------------------------------------------------------- creating


def new_run_id(name: str) -> str:
    import secrets

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{name}-{secrets.token_hex(3)}"


def create_run_folder(root: Path, name: str) -> Path:
    """A fresh run folder; mkdir is atomic, so parallel launches never share one."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdlError(
            f"cannot create the runs folder {root}: {exc.strerror}. "
            "Choose another with --runs-dir or KDL_RUNS_DIR."
        ) from None
    for _ in range(100):
        folder = root / new_run_id(name)
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise KdlError(
                f"cannot create a run folder in {root}: {exc.strerror}. "
                "Check that it is writable and has space, or choose another with --runs-dir."
            ) from None
        (folder / CHECKPOINTS).mkdir()
        return folder
    raise KdlError(f"could not find a free run id in {root} after 100 tries")


# ----------------------------------------------------------------------------- reading


class Run:
    """A run folder, read lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.id = self.path.name
        self._meta: dict[str, Any] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = read_json(self.path / META)
        return self._meta

    @property
    def status(self) -> str:
        """meta's status, except that a 'running' run whose process is gone is 'crashed'."""
        status = self.meta.get("status", "unknown")
        if status == "running" and not _process_alive(self.meta):
            return "crashed"
        return status

    def config_dict(self) -> dict[str, Any]:
        """config.yaml as a dict; through libyaml where PyYAML has it (about 10x faster, which
        decides how long --where and compare take over hundreds of runs)."""
        import yaml

        try:
            text = (self.path / CONFIG).read_text()
            return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        except (OSError, yaml.YAMLError):
            return {}

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def summary(self) -> dict[str, Any]:
        return read_json(self.path / SUMMARY)

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
            tokens = json.loads((self.path / VOCAB).read_text())
        except (OSError, ValueError):
            return None
        return tokens if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else None

    def checkpoint(self, which: str) -> Path:
        return self.path / CHECKPOINTS / f"{which}.pt"



def short_id(run_id: str) -> str:
    """`digits_cnn-a0b645` for `20261130-021835-digits_cnn-a0b645`: what tells runs apart."""
    parts = run_id.split("-", 2)
    stamped = len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit()
    return parts[2] if stamped else run_id


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


def _process_alive(meta: dict[str, Any]) -> bool:
    pid = meta.get("pid")
    if not pid or meta.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, trust the file
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _same_process(int(pid), meta.get("pid_started"))


def _same_process(pid: int, started: Any) -> bool:
    """Guard against pid reuse: compare the process start time recorded at launch."""
    if started is None:
        return True
    now = process_start_time(pid)
    return now is None or now == started


def process_start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def iter_runs(root: Path) -> Iterator[Run]:
    if not root.is_dir():
        return
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, META)):
            yield Run(Path(entry.path))


def resolve_run(root: Path, ref: str) -> Run:
    """A run id, a unique prefix of one, `latest`, or the path of a real run folder."""
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
    if (exact / META).is_file():
        return Run(exact)
    matches = [run for run in iter_runs(root) if run.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KdlError(
            f"no run {ref!r} in {root}. List runs with `kdl runs` (or choose the folder with "
            "--runs-dir / KDL_RUNS_DIR)."
        )
    shown = ", ".join(run.id for run in matches[:5])
    raise KdlError(f"run prefix {ref!r} is ambiguous in {root}: it matches {shown}; give more of the id")


def resolve_runs(root: Path, refs: list[str]) -> list[Run]:
    """Several run references, each resolved like `resolve_run`; a run named twice counts once."""
    found: dict[Path, Run] = {}
    for ref in refs:
        run = resolve_run(root, ref)
        found.setdefault(run.path.resolve(), run)
    return list(found.values())


def run_environment(command: list[str]) -> dict[str, Any]:
    """Where and how a run was launched (torch versions are added by the engine)."""
    import platform
    import sys

    pid = os.getpid()
    return {
        "command": command,
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "pid": pid,
        "pid_started": process_start_time(pid),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

