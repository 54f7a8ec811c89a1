"""Run `kdl` in a pseudo-terminal, as a person at a terminal does, and read the screen they see.

The raw bytes (everything ever drawn, control codes included) and the final screen rendered by a
terminal emulator (pyte) are both kept: a progress bar that was drawn and then cleared is in the
first and not in the second.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyte

ROWS, COLUMNS = 60, 150


@dataclass
class Screen:
    exit_code: int
    raw: str  # every byte written, decoded
    lines: list[str]  # the final screen, trailing blank lines dropped

    @property
    def plain(self) -> str:
        """`raw` without colours and cursor moves."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.raw)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def run_in_terminal(args: list[str], env: dict[str, str] | None = None,
                    on_output: Callable[[str, subprocess.Popen], None] | None = None,
                    timeout: float = 120.0, columns: int = COLUMNS) -> Screen:
    """`python -m karpathy_runner ARGS` on a pseudo-terminal; `on_output(raw_so_far, process)` is
    called as output arrives (to press Ctrl-C at the right moment)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "karpathy_runner", *args], stdin=slave, stdout=slave, stderr=slave,
        # the terminal's own size, not COLUMNS or LINES that a test runner may have set
        env={**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
             "TERM": "xterm-256color", "OMP_NUM_THREADS": "1", **(env or {})},
        start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
                if on_output is not None:
                    on_output(received.decode(errors="replace"), process)
            elif process.poll() is not None:
                break
        exit_code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    raw = received.decode(errors="replace")
    screen = pyte.Screen(columns, ROWS)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n").replace("\r\r\n", "\r\n"))
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return Screen(exit_code, raw, lines)


def press_ctrl_c_once(when: Callable[[str], bool]) -> Callable[[str, subprocess.Popen], None]:
    """An `on_output` that types Ctrl-C on the terminal (the line discipline sends SIGINT to the
    foreground process group) the first time `when(raw_so_far)` holds."""
    pressed = []

    def on_output(raw: str, process: subprocess.Popen) -> None:
        if not pressed and when(raw):
            pressed.append(True)
            os.killpg(process.pid, signal.SIGINT)

    return on_output
