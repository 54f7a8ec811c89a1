"""Errors the CLI turns into one clear paragraph and an exit code (never a traceback)."""

from __future__ import annotations

QUOTE_LIMIT = 200  # characters of a value an error message repeats
MAX_PROBLEMS = 20  # problems a config error lists


def quoted(value: object) -> str:
    """repr(value), cut to QUOTE_LIMIT characters: a message never repeats a huge value."""
    text = repr(value)
    if len(text) <= QUOTE_LIMIT:
        return text
    return f"{text[:QUOTE_LIMIT]}... ({len(text):,} characters in all)"


def what_is(path: object) -> str:
    """What stands at a path that is not a regular file, for an error: 'a folder', 'a FIFO
    (named pipe)', 'a device', 'a socket', or 'missing'."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode  # type: ignore[arg-type]
    except OSError:
        return "missing"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


class KdlError(Exception):
    """Bad usage, bad config or missing input: the user can fix it. Exit code 2."""

    exit_code = 2


class RunFailed(KdlError):
    """The run itself failed (e.g. the loss became NaN). Exit code 1."""

    exit_code = 1


class ConfigError(KdlError):
    """One or more problems in a config, each naming the key path and the fix."""

    def __init__(self, problems: list[str], source: str | None = None):
        if len(problems) > MAX_PROBLEMS:  # a huge wrong value: its first problems say enough
            problems = [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS:,} more"]
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"config error{where}:" if len(problems) > 1 else f"config error{where}: {problems[0]}"]
        if len(problems) > 1:
            lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))
