"""The `kdl` app: the command group, its error handling (a KdlError is one paragraph and its exit
code, never a traceback), and the options the commands share."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .. import __version__, workers
from ..errors import KdlError
from ..runfolder.layout import host_name


class Command(TyperCommand):
    """Usage lines as people write them: `kdl eval [OPTIONS] RUN`, `kdl rm [OPTIONS] RUN...`
    (typer's own wraps required arguments in braces)."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [piece.removeprefix("{").removesuffix("}") for piece in super().collect_usage_pieces(ctx)]


class _Commands(TyperGroup):
    """Turns a KdlError from any command into one paragraph on stderr and its exit code,
    and a Ctrl-C outside the training loop into exit 130 (not click's 'Aborted!' and 1)."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except KdlError as exc:
            workers.say_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C before a loop started (a running loop has its own)
            print("interrupted", file=sys.stderr, flush=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `kdl eval RUN | head -2`: the reader left early
            raise typer.Exit(_reader_left()) from None


def _reader_left() -> int:
    """Stop quietly, as Unix tools do when their reader closes the pipe: the exit status a shell
    shows for them (141 = 128 + SIGPIPE), and no "Exception ignored ... BrokenPipeError" from
    Python flushing stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


app = typer.Typer(
    cls=_Commands,
    name="kdl",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=True,
)

RunsDir = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--runs-dir", help="Folder of run folders (default: $KDL_RUNS_DIR or ./runs)."),
]
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--set", "-s", help="Override a config key: --set optimizer.lr=0.1 (repeatable)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
CsvFlag = Annotated[bool, typer.Option("--csv", help="Print the table as CSV.")]
ForceFlag = Annotated[bool, typer.Option("--force", help="Start more processes than this "
                                         "machine has CPU cores or free memory for.")]
RUN_HELP = "Run id, unique prefix, run folder, 'latest' or a unique run name."
RUNS_HELP = "Run ids, unique prefixes, run folders, 'latest' or unique run names."
RunArgument = Annotated[str, typer.Argument(metavar="RUN", help=RUN_HELP)]
RunsArgument = Annotated[
    Optional[list[str]], typer.Argument(metavar="RUN...", help=RUNS_HELP)  # noqa: UP045
]
CheckpointOption = Annotated[str, typer.Option(help="best or last.")]


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            torch = f"torch {version('torch')}"
        except PackageNotFoundError:
            torch = "torch not installed"
        echo(f"kdl {__version__} (python {sys.version.split()[0]}, {torch})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print kdl's version and exit.")] = False,
) -> None:
    """Run classic deep-learning experiments from YAML configs: CNNs on images, RNN/LSTM/GRU on
    sequences and text (classifiers and character language models), GANs."""
    host_name()  # a KDL_HOST kdl cannot use is refused before a command records it anywhere


def check_checkpoint(checkpoint: str) -> None:
    if checkpoint not in ("best", "last"):
        raise KdlError(f"--checkpoint must be best or last, got {checkpoint!r}")


def echo(text: str) -> None:
    """Results go to stdout; everything else (logs, progress) goes to stderr."""
    print(text, flush=True)


# what one kdl training process holds at its peak: 782 MB resident for configs/digits_cnn.yaml
# (torch and its libraries are most of it); a bigger model or dataset needs more
PROCESS_MEMORY = 800 * 2**20


def check_processes(count: int, option: str, force: bool) -> None:
    """Refuse to start `count` training processes at once (`option` asked for them) where this
    machine has fewer CPU cores than that, or less free memory than they need, unless `force`:
    past the cores they only slow each other down, past the memory the machine swaps or kills
    them, and 64 of them at once take a 2-core machine minutes to recover from."""
    if force or count <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    available = _available_memory()
    needed = count * PROCESS_MEMORY
    if count > cores:
        why = f"this machine gives kdl {cores} CPU core{'s' if cores > 1 else ''}"
    elif available is not None and needed > available:
        why = (f"they need about {needed / 2**30:.1f} GiB of memory ({PROCESS_MEMORY // 2**20} MB "
               f"each) and {available / 2**30:.1f} GiB is free")
    else:
        return
    most = max(1, min(cores, (available // PROCESS_MEMORY) if available is not None else cores))
    raise KdlError(f"{option} {count}: {why}, so that many training processes at once would only "
                   f"slow each other down or run out of memory. Use {option} {most} or fewer, or add "
                   "--force to start them anyway.")


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
