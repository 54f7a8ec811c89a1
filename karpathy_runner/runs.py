"""The run-folder contract: layout, atomic files, create, find, list, read, status.

Writing a run's files is writer.RunWriter's job; selecting, sorting and comparing many runs is
compare.py's. Imports nothing heavy (no torch, no pydantic) so that `kdl runs` and `kdl show`
start fast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import KdlError

DEFAULT_RUNS_DIR = "runs"
STATUSES = ("running", "completed", "paused", "failed", "interrupted", "crashed", "damaged")

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
LOCK = ".lock"
TEMP_SUFFIX = ".tmp"

# what atomic_write writes: the bytes, or a function that writes them into a file handle
Content = bytes | bytearray | memoryview | Callable[[IO[bytes]], Any]


def runs_dir(option: str | Path | None = None) -> Path:
    """--runs-dir, else $KDL_RUNS_DIR, else ./runs."""
    return Path(option or os.environ.get("KDL_RUNS_DIR") or DEFAULT_RUNS_DIR)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- atomic files


def atomic_write(path: Path, data: Content, also: Sequence[Path] = (),
                 folder_fd: int | None = None) -> None:
    """Write `data` (bytes, or a function that writes into a handle) into a temp file beside
    `path`, fsync, rename over it.

    `also`: more names in the same folder for the same bytes, renamed into place first, in
    order. Each is a hard link of the one temp file, so the bytes are written and fsynced once
    (a second copy is written where the file system has no hard links), and the folder is
    fsynced once, after the last rename. The next atomic write of any one name makes a new
    file, so the others keep their bytes. The temp files are locked until they are renamed,
    so `remove_stale_temps` knows a live writer's from one a kill left behind.

    `folder_fd`: a descriptor of the folder, kept open by a caller that writes there often
    (the checkpoint thread): fsynced instead of opening the folder each time."""
    path = Path(path)
    made: list[Path] = []  # temp files, to remove if anything fails before they are renamed
    with contextlib.ExitStack() as locks:  # each temp file's handle (and lock) until the renames
        try:
            first = _written_temp(path, data, locks, made)
            temps = [_linked_temp(first, other, made) or _written_temp(other, data, locks, made)
                     for other in also]
            for temp, target in zip([*temps, first], [*also, path], strict=True):
                os.replace(temp, target)
        except BaseException:
            for temp in made:
                temp.unlink(missing_ok=True)
            raise
    if folder_fd is None:
        _fsync_dir(path.parent)
    else:
        _fsync_folder(folder_fd)


def _written_temp(path: Path, data: Content, locks: contextlib.ExitStack, made: list[Path]) -> Path:
    """A new temp file beside `path`, locked (held open in `locks`), written and fsynced.

    It is made with the mode open() gives a new file (0o666 less the umask, as the run's other
    files): the umask applied by the kernel, never read by setting it, which would give any
    file another thread makes meanwhile a umask of 0. Bytes go straight to the file, in as few
    system calls as the kernel takes (on the checkpoint thread each call hands the GIL over
    and back)."""
    import fcntl

    while True:
        name = _temp_name(path)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:  # a temp file a killed process of the same id left
            continue
    locks.callback(os.close, fd)
    made.append(name)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if callable(data):
        with os.fdopen(fd, "wb", closefd=False) as handle:
            data(handle)
    else:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    os.fsync(fd)
    return name


def _linked_temp(temp: Path, path: Path, made: list[Path]) -> Path | None:
    """A hard link of `temp` under a temp name for `path` (locked with it: one file), or None
    where the file system makes none."""
    link = _temp_name(path)
    try:
        os.link(temp, link)
    except OSError:  # no hard links here (EPERM, ENOTSUP...), or the name is taken: a copy then
        return None
    made.append(link)
    return link


_TEMPS = itertools.count()  # (next() is atomic: threads never draw the same number)


def _temp_name(path: Path) -> Path:
    """A new name for a temp file beside `path`: hidden, and found by `remove_stale_temps`;
    this process's id and a count make it new (without a system call: on the checkpoint
    thread each one hands the GIL over and back), and O_EXCL makes sure of it."""
    return path.parent / f".{path.name}.{os.getpid()}-{next(_TEMPS)}{TEMP_SUFFIX}"


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files of writers that died mid-write (no live writer holds their lock)."""
    import fcntl

    removed = []
    for temp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        try:
            fd = os.open(temp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            temp.unlink(missing_ok=True)
            removed.append(temp)
        except OSError:  # locked: its writer is alive
            pass
        finally:
            os.close(fd)
    return removed


class RunLock:
    """An exclusive lock on a run folder (flock on its .lock file), held while one process
    trains, resumes or removes the run; the kernel releases it when the process dies, however."""

    def __init__(self, folder: Path, what: str | None = None):
        self.folder = Path(folder)
        self.what = what or f"run {self.folder.name}"  # what the lock guards, for its message
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Lock the run, or fail naming the process that holds it; then clear stale temp files."""
        import fcntl

        try:
            fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise KdlError(f"cannot lock {self.what} ({self.folder}): {exc.strerror}. Check that "
                           "the folder is writable.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise KdlError(
                f"{self.what} is in use by another kdl process (pid {holder}); only one process "
                f"may work on a {self.what.split()[0]} at a time. Wait for it to end, or stop it "
                f"(kill {holder}) and try again."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        remove_stale_temps(self.folder)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_holder(fd: int) -> str:
    """The pid in a locked run's .lock file. Its holder writes it just after taking the lock,
    so a process that lost the race by a moment waits for it (half a second at most)."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = open_folder(folder)
    except OSError:
        return
    try:
        _fsync_folder(fd)
    finally:
        os.close(fd)


def _fsync_folder(fd: int) -> None:
    """The folder's entries (a rename) on disk; where the file system cannot fsync a folder,
    nothing."""
    with contextlib.suppress(OSError):
        os.fsync(fd)


def open_folder(folder: Path) -> int:
    """A descriptor of `folder` for `atomic_write(folder_fd=...)`; the caller closes it."""
    return os.open(folder, os.O_RDONLY | os.O_CLOEXEC)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """A JSON file's bytes, as every JSON file of a run is written."""
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; {} if it is missing or damaged (read_object says why)."""
    return read_object(path)[0]


def read_object(path: Path) -> tuple[dict[str, Any], str | None]:
    """A JSON object file and, if it is there but unusable, why: never an exception."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"cannot be read ({exc.strerror})"
    except UnicodeDecodeError:
        return {}, "is not UTF-8 text"
    except RecursionError:
        return {}, "is nested too deeply to read"
    except ValueError as exc:
        return {}, f"is not valid JSON ({exc})"
    if not isinstance(value, dict):
        return {}, f"holds a JSON {type(value).__name__}, not an object"
    return value, None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a truncated last line (a kill mid-write) is skipped."""
    return read_records(path)[0]


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl's records (each with an int step and epoch and a str split), and how many
    other lines it holds (binary, not JSON, not such a record), a truncated last line aside."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError:
        return [], 0
    records, bad = [], 0
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            bad += number < len(lines) - 1  # the last line without its newline: cut short by a kill
            continue
        if (isinstance(record, dict) and _is_int(record.get("step"))
                and _is_int(record.get("epoch")) and isinstance(record.get("split"), str)):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


# the types of the meta.json and summary.json keys that readers use; a key of another type is
# damage, dropped so that no reader meets it
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "name": str, "status": str, "model": str, "dataset": str, "task": str,
    "created_at": str, "host": str, "pid": int, "epochs": int, "epochs_done": int, "step": int,
    "duration_s": (int, float), "best": dict, "sweep": dict, "versions": dict,
    "metric_modes": dict, "resumes": list, "command": list,
}
SUMMARY_TYPES: dict[str, type | tuple[type, ...]] = {"final": dict, "best": dict}


class Run:
    """A run folder, read lazily. A damaged file (not JSON, not an object, binary, keys of the
    wrong type) reads as empty and is noted in `damage`: no reader ever raises on a run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.id = self.path.name
        self._meta: dict[str, Any] | None = None
        self._summary: dict[str, Any] | None = None
        self.problems: dict[str, str] = {}  # file name -> what is wrong with it

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
        return self._meta

    @property
    def damage(self) -> str | None:
        """What is wrong with the files read so far (meta.json always), or None."""
        _ = self.meta
        return "; ".join(f"{name} {problem}" for name, problem in self.problems.items()) or None

    @property
    def status(self) -> str:
        """meta's status, except that a 'running' run whose process is gone is 'crashed', and
        a run whose files are damaged is 'damaged'."""
        status = self.meta.get("status", "unknown")
        if self.damage:
            return "damaged"
        if status == "running" and not _process_alive(self.meta):
            return "crashed"
        return status

    def config_dict(self) -> dict[str, Any]:
        """config.yaml as a dict ({} if damaged, noted in `damage`)."""
        from .safe_yaml import UnsafeYaml, parse

        try:
            raw = parse((self.path / CONFIG).read_bytes().decode("utf-8"))
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
            tokens = json.loads((self.path / VOCAB).read_text())
        except (OSError, ValueError, RecursionError):
            return None
        return tokens if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else None

    def checkpoint(self, which: str) -> Path:
        return self.path / CHECKPOINTS / f"{which}.pt"


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
            f"or restore the file in {run.path}, or remove the run with `kdl rm {run.id}`."
        )


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
        # a symlink is not a run of this folder (it points elsewhere; `kdl rm` would follow it)
        if (not entry.is_symlink() and entry.is_dir()
                and os.path.exists(os.path.join(entry.path, META))):
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
    if (exact / META).is_file() and not exact.is_symlink():
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

