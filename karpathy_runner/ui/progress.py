"""What a training process shows a person: a progress bar on a terminal, plain lines otherwise.

Everything goes to stderr, so that stdout holds only the run id (or the --json result).
The bar moves every step (a counter, no device sync) and gets metrics at log intervals; rich
redraws it at most twice a second. It shows the epoch's time left and the whole run's progress
and time left, and it is cleared when training ends: the epoch lines and the summary stay.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def format_duration(seconds: float | None) -> str:
    """1h02m, 3m05s, 42s: short enough for a bar and a table cell; '-' for unknown."""
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if abs(value) < 1e4 else f"{key} {value:.0f}")
        elif value is not None:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class Reporter:
    def __init__(self, quiet: bool = False, rank: int = 0, stream: Any = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet or rank != 0  # of several training processes, rank 0 speaks
        self.rank = rank
        self.live = not quiet and self.stream.isatty()
        self._progress = None
        self._bar = None
        self._total_steps = 0
        self._batches_per_epoch = 0
        self._epoch = 0
        self._first_step: int | None = None  # the run's step when this process started training
        self._started = 0.0

    def message(self, line: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)

    def notice(self, line: str) -> None:
        """A line that must reach the screen even with --quiet."""
        if self.rank != 0:  # of several training processes, rank 0 speaks
            return
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total_batches: int, done: int,
                    total_steps: int = 0) -> None:
        """`total_steps`: the run's planned steps (epochs x batches, or train.max_steps)."""
        self._epoch, self._batches_per_epoch = epoch, total_batches
        self._total_steps = total_steps or epochs * total_batches
        if self._first_step is None:
            self._first_step, self._started = epoch * total_batches + done, time.perf_counter()
        if not self.live:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[run]}"),
                TextColumn("{task.fields[metrics]}"),
                console=Console(file=self.stream),
                refresh_per_second=2,
                transient=True,  # a finished run leaves its epoch lines and summary, not a bar
            )
            self._progress.start()
        if self._bar is not None:
            self._progress.remove_task(self._bar)
        self._bar = self._progress.add_task(
            f"epoch {epoch + 1}/{epochs}", total=total_batches, completed=done, metrics="",
            run=self.run_progress(done),
        )

    def run_progress(self, batches_done: int) -> str:
        """'run 42% eta 3m10s': the whole run, from the pace of this process's steps so far
        (epoch ends and evaluation included)."""
        step = self._epoch * self._batches_per_epoch + batches_done
        total = max(self._total_steps, 1)
        text = f"| run {min(100, 100 * step // total)}%"
        done_here = step - (self._first_step or 0)
        if done_here > 0:
            seconds_per_step = (time.perf_counter() - self._started) / done_here
            text += f" eta {format_duration((total - step) * seconds_per_step)}"
        return text + " |"

    def advance(self, batches_done: int) -> None:
        """Move the bar (no metrics: those need a device sync and come at log intervals)."""
        if self._bar is not None:
            self._progress.update(self._bar, completed=batches_done, run=self.run_progress(batches_done))

    def update(self, batches_done: int, metrics: dict[str, Any]) -> None:
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, completed=batches_done, metrics=format_metrics(metrics),
                                  run=self.run_progress(batches_done))

    def end_epoch(self, line: str) -> None:
        self.message(line)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
