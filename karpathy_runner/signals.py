"""SIGINT and SIGTERM for a run's whole life: from before its folder exists to its last file.

The handler only records the signal: no file, no lock, no print in it (a handler runs between
any two bytecodes of the main thread, inside a write to train.log or to the screen as well).
The loop asks after each step whether one came, logs it and acts on it (`heard`).

The first signal asks the loop to stop after its step, with a checkpoint (a run stopped before
its first step saves step 0: it is `interrupted` and resumable). A second SIGINT stops the loop
at once; outside the loop (start-up, the final writes) signals are only recorded, so no write of
the run's files is ever cut short.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any


class Stop:
    """The signals of one run: recorded by the handler, told by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal that came
        self.in_loop = False
        self.world = 1  # training processes: with several, a second SIGINT is torchrun's echo
        self._told = False  # has the loop said that the first signal came?
        self._installed = False

    def heard(self) -> str | None:
        """What to say of a signal that came and was not said yet (once), or None."""
        if self.signum is None or self._told:
            return None
        self._told = True
        return signal.Signals(self.signum).name

    @staticmethod
    def notice(name: str) -> str:
        """The screen's line for a stop signal."""
        if name == "SIGINT":
            return "Ctrl-C: stopping after this step with a checkpoint; Ctrl-C again to stop now"
        return f"{name}: stopping after this step with a checkpoint"

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handlers in place for the block (nested uses keep the outer ones)."""
        if self._installed:
            yield
            return
        owner = os.getpid()

        def handler(signum: int, frame: Any) -> None:
            # a DataLoader worker forked with this handler, before it sets its own (data/batches)
            if os.getpid() != owner:
                return
            # (torchrun forwards a terminal's Ctrl-C that every process already got: a second
            # SIGINT is the same one there, not a request to abandon the step)
            if self.signum is not None and signum == signal.SIGINT and self.in_loop and self.world == 1:
                raise KeyboardInterrupt
            self.signum = self.signum or signum

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        self._installed = True
        try:
            yield
        finally:
            self._installed = False
            for s, old in previous.items():
                signal.signal(s, old)
