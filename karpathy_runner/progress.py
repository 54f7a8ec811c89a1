"""What a training process shows a person: a progress bar on a terminal, plain lines otherwise.

Everything goes to stderr, so that stdout holds only the run id (or the --json result).
The bar moves every step (a counter, no device sync) and gets metrics at log intervals; rich
redraws it at most twice a second.
"""

from __future__ import annotations

import sys
from typing import Any


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
        self.live = not quiet and self.stream.isatty()
        self._progress = None
        self._bar = None

    def message(self, line: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total_batches: int, done: int) -> None:
        if not self.live:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=Console(file=self.stream),
                refresh_per_second=2,
                transient=False,
            )
            self._progress.start()
        if self._bar is not None:
            self._progress.remove_task(self._bar)
        self._bar = self._progress.add_task(
            f"epoch {epoch + 1}/{epochs}", total=total_batches, completed=done, metrics=""
        )

    def advance(self, batches_done: int) -> None:
        """Move the bar (no metrics: those need a device sync and come at log intervals)."""
        if self._bar is not None:
            self._progress.update(self._bar, completed=batches_done)

    def update(self, batches_done: int, metrics: dict[str, Any]) -> None:
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, completed=batches_done, metrics=format_metrics(metrics))

    def end_epoch(self, line: str) -> None:
        self.message(line)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
