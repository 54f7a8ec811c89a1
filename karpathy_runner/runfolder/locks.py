"""The locks that keep to one process per run, per claimed config, per sweep and per study on a
machine: an exclusive flock on a file, which the kernel releases when its holder dies, however.
A run's lock file also carries the training process's heartbeat (layout.Heartbeat): its time,
which taking the lock leaves as it was."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import KdlError
from .fsio import refuse_foreign, remove_stale_temps
from .layout import LOCK


class Lock:
    """An exclusive lock (flock) on the file `path`, held while one process works on `what`; the
    kernel releases it when the process dies, however. A symlink or anything but a regular file
    at `path` is refused, never followed or written. `transient`: the holder removes the file as
    it lets go (a claim's would stay for good), and one that waited takes the file at the path."""

    def __init__(self, path: Path, what: str, transient: bool = False):
        self.path = Path(path)
        self.what = what
        self.transient = transient
        self._fd: int | None = None

    def acquire(self, wait: Callable[[str], None] | None = None) -> Lock:
        """Take the lock. Held by another process: an error naming it (its pid), or, given
        `wait`, wait for it to let go, after telling `wait` the holder's pid."""
        import fcntl

        while True:
            fd = self._open()
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # not held: refused
                        raise KdlError(
                            f"cannot lock {self.what} ({self.path}): its file system does not lock "
                            f"files ({exc.strerror}), and kdl keeps to one process per "
                            f"{self.what.split()[0]} with flock. Mount it with file locks (Lustre: "
                            "-o flock), or choose a folder on a file system that has them") from None
                    holder = _lock_holder(fd)
                    if wait is None:
                        raise KdlError(
                            f"{self.what} is in use by another kdl process (pid {holder}); only one "
                            f"process may work on a {self.what.split()[0]} at a time. Wait for it to "
                            f"end, or stop it (kill {holder}) and try again.") from None
                    wait(holder)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if self._still_at_path(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder removed it as it let go: take the one at the path now
        # the holder's pid, for the messages of those that wait; the file's time is left as it
        # was: it is the heartbeat of the run's training process (layout.Heartbeat), which a
        # process that only looks at the run must not renew
        held = os.fstat(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.utime(fd, ns=(held.st_atime_ns, held.st_mtime_ns))
        self._fd = fd
        return self

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            refuse_foreign(self.path, stat.S_ISREG)  # a symlink or a folder: said as such
            raise KdlError(f"cannot lock {self.what} ({self.path}): {exc.strerror}. Check that "
                           "its folder is writable.") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device, a socket
            os.close(fd)
            refuse_foreign(self.path, stat.S_ISREG)
        return fd

    def _still_at_path(self, fd: int) -> bool:
        """Is the file locked through `fd` the one at the path (not one a holder removed)? A
        symlink or other thing put there meanwhile is refused."""
        try:
            here = os.lstat(self.path)
        except FileNotFoundError:
            return False
        refuse_foreign(self.path, stat.S_ISREG)
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            if self.transient:  # first: a waiter that gets the lock then sees the file gone
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(Lock):
    """The lock of a run folder (its .lock file), held while one process trains, resumes or
    removes the run; taking it clears the temp files that writers killed mid-write left."""

    def __init__(self, folder: Path, what: str | None = None):
        self.folder = Path(folder)
        super().__init__(self.folder / LOCK, what or f"run {self.folder.name}")

    def acquire(self, wait: Callable[[str], None] | None = None) -> RunLock:
        super().acquire(wait)
        remove_stale_temps(self.folder)
        return self


def _lock_holder(fd: int) -> str:
    """The pid in a locked run's .lock file. Its holder writes it just after taking the lock,
    so a process that lost the race by a moment waits for it (half a second at most)."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"
