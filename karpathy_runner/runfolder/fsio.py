"""File operations every writer of a run folder uses: atomic replacement (temp file beside the
target, fsync, rename, folder fsync), stale temp files, reading JSON and JSONL files that may be
damaged without ever raising. The locks (a run's, a claim) are locks.py's."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from ..errors import KdlError
from .layout import TEMP_SUFFIX

# what atomic_write writes: the bytes, or a function that writes them into a file handle
Content = bytes | bytearray | memoryview | Callable[[IO[bytes]], Any]


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


def write_output(path: Path, data: Content) -> Path:
    """A file the user named (`--out`): a regular file is replaced atomically, a missing one
    created (with its folders); anything else at the path is refused (check_output)."""
    path = check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise KdlError(f"cannot write --out {path}: {exc.strerror or exc}. Give a file path you "
                       "can write to.") from None
    return path


def check_output(path: Path) -> Path:
    """`path` if a file may be written there: a regular file or nothing; a folder, a symlink, a
    FIFO, a device or a socket is an error naming it, before any work is done."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise KdlError(f"cannot write --out {path}: {exc.strerror}. Give a file path you can "
                       "write to.") from None
    if not stat.S_ISREG(mode):
        example = path / "out.png" if stat.S_ISDIR(mode) else path.with_name("out.png")
        raise KdlError(f"--out {path} is {_what(path, mode)}, not a file; kdl replaces only a "
                       f"regular file (or makes a new one), never writes through a link or over "
                       f"anything else. Give the path of a file, e.g. --out {example}")
    return path


def _what(path: Path, mode: int) -> str:
    """What stands at `path` (lstat's `mode`): a symbolic link named with its target, or what
    errors.what_is calls it."""
    from ..errors import what_is

    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    return what_is(path)


def own_folder(path: Path) -> Path:
    """A folder inside a run folder (eval/, samples/), made if missing; a symlink or anything
    else standing there is refused, so that nothing is written outside the run."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)  # (does not follow a symlink: it exists)
    refuse_foreign(path, stat.S_ISDIR)
    return path


def refuse_foreign(path: Path, kind: Callable[[int], bool] = lambda mode: True) -> None:
    """An entry that kdl writes (in a run folder, a lock): missing, or what kdl made (`kind` of
    its mode), never a symlink; else an error naming it (nothing written)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode) or not kind(mode):
        raise KdlError(
            f"{path} is {_what(path, mode)}, which kdl did not make; it writes only what it made, "
            f"never through a link or over what is not its own. Move it away (or remove it: rm "
            f"{path}) and run the command again. Nothing was written.")


def open_append(path: Path) -> IO[str]:
    """A run's log (metrics.jsonl, train.log) opened to append to: a regular file, never a
    symlink (O_NOFOLLOW), a FIFO or a device (O_NONBLOCK: opening a FIFO for writing would wait
    for a reader)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return open(fd, "a", encoding="utf-8")  # noqa: SIM115


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """A JSON file's bytes, as every JSON file of a run is written."""
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def read_bytes(path: Path, limit: int | None = None, offset: int = 0) -> bytes:
    """A regular file's bytes (at most `limit` of them from `offset`). Anything else at the path
    (a FIFO, a device, a socket, a folder) raises OSError "not a regular file" before a byte is
    read: opening a FIFO to read waits for a writer, and a device may never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as handle:
            if offset:
                handle.seek(offset)
            return handle.read() if limit is None else handle.read(limit)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; {} if it is missing or damaged (read_object says why)."""
    return read_object(path)[0]


def read_object(path: Path) -> tuple[dict[str, Any], str | None]:
    """A JSON object file and, if it is there but unusable, why: never an exception."""
    try:
        value = json.loads(read_bytes(path).decode("utf-8"))
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


def read_jsonl_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line that is not one (a cut last line, damage)
    is skipped; [] for a missing file."""
    try:
        lines = read_bytes(path).split(b"\n")
    except OSError:
        return []
    objects = []
    for line in lines:
        try:
            value = json.loads(line.decode("utf-8")) if line.strip() else None
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a truncated last line (a kill mid-write) is skipped."""
    return read_records(path)[0]


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl's records (each with an int step and epoch and a str split), and how many
    other lines it holds (binary, not JSON, not such a record), a truncated last line aside."""
    try:
        lines = read_bytes(path).split(b"\n")
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
        if is_record(record):
            records.append(record)
        else:
            bad += 1
    return records, bad


def is_record(value: Any) -> bool:
    """A metrics.jsonl record: an object with an int step and epoch and a str split."""
    return (isinstance(value, dict) and _is_int(value.get("step")) and _is_int(value.get("epoch"))
            and isinstance(value.get("split"), str))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

