"""The `kdl` command line: parse arguments, make one call, print. Nothing else.

app.py holds the command group and the shared options; each other module holds one group of
commands, added to the app when it is imported here. torch and pydantic are imported inside the
commands that need them, so `kdl --help`, `kdl runs` and `kdl show` start fast. Errors a user can
fix print one paragraph and exit 2.
"""

from __future__ import annotations

from .app import app

# each module adds its commands to the app, in this order in `kdl --help`
# isort: off
from . import train, evaluate, export, sweep, runs  # noqa: E402, F401
# isort: on

__all__ = ["app", "exit_last", "main"]


def main(ending: _Ending | None = None) -> None:
    """The `kdl` command. Once the command is done, the process exits at once, skipping
    Python's teardown of the modules it loaded: for a command that trained, the teardown of
    torch (torch.optim imports torch._dynamo and sympy: some 2,500 modules) takes most of a
    second on a laptop and several on a loaded machine, all after the run's last line, long
    enough to turn a clean run into a `timeout` failure. Everything kdl writes is closed and
    synced by then; the exit handlers that the command's libraries registered (DataLoader
    workers, trackers, logging) still run first. A sweep's fork server, which imports them
    before it forks the point that calls this, gives the `ending` it registered before."""
    ending = ending or exit_last()
    try:
        app()
    except SystemExit as exc:
        ending.code = exc.code
        raise
    except KeyboardInterrupt:  # outside the loop's own handling: as Python ends on one
        ending.code = 130
        raise
    except BaseException:  # a bug: Python prints its traceback, and the status is 1
        ending.code = 1
        raise


class _Ending:
    """The exit status of the command, and the end of the process once the handlers have run."""

    def __init__(self) -> None:
        self.code: object = None

    def exit(self) -> None:
        import os
        import sys

        code = self.code
        if code is None:  # an exception escaped before main() could note it (a Ctrl-C in that
            # instant, in a sweep's forked point): Python printed it, and its status is said so
            escaped = getattr(sys, "last_value", None)
            code = None if escaped is None else 130 if isinstance(escaped, KeyboardInterrupt) else 1
        status = 0 if code is None else code if isinstance(code, int) else 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # the reader left, or the stream is closed
                pass
        os._exit(status)


def exit_last() -> _Ending:
    """The end of the process, registered now as the exit handler that runs last (the first
    registered runs last): after those of every library imported from now on."""
    import atexit

    ending = _Ending()
    atexit.register(ending.exit)
    return ending
