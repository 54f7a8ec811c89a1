"""The `kdl` command line: parse arguments, call the engine, print. Nothing else.

torch and pydantic are imported inside the commands that need them, so `kdl --help`,
`kdl runs` and `kdl show` start fast. Errors a user can fix print one paragraph and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from . import runs
from .errors import KdlError

class _Commands(TyperGroup):
    """Turns a KdlError from any command into one paragraph on stderr and its exit code."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except KdlError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Commands,
    name="kdl",
    help="Run classic deep-learning experiments (CNN, RNN, GAN) from YAML configs.",
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


def _out(text: str) -> None:
    """Results go to stdout; everything else (logs, progress) goes to stderr."""
    print(text, flush=True)


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config file.")] = None,  # noqa: UP045
    set_: SetOption = None,
    name: Annotated[Optional[str], typer.Option(help="Run name (config key `name`).")] = None,  # noqa: UP045
    device: Annotated[
        Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps (train.device).")  # noqa: UP045
    ] = None,
    runs_dir: RunsDir = None,
    resume: Annotated[
        Optional[str], typer.Option(help="Continue RUN from its own config and last checkpoint.")  # noqa: UP045
    ] = None,
    allow_changes: Annotated[
        bool, typer.Option(help="With --resume: accept --set changes (recorded in meta.json).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a model; prints the run id as the last line of stdout."""
    from . import engine

    overrides = list(set_ or [])
    if name is not None:
        overrides.append(f"name={name}")
    if device is not None:
        overrides.append(f"train.device={device}")
    if config is None and resume is None:
        raise KdlError("give a CONFIG file to train, or --resume RUN to continue a run")
    if config is not None and resume is not None:
        raise KdlError("give either a CONFIG file or --resume RUN, not both")
    result = engine.train(
        str(config) if config else None,
        overrides,
        runs.runs_dir(runs_dir),
        command=["kdl", *sys.argv[1:]],
        quiet=quiet,
        resume=resume,
        allow_changes=allow_changes,
    )
    if as_json:
        _out(json.dumps({"id": result.run_id, "status": result.status,
                         "folder": str(result.folder), "summary": result.summary}))
    else:
        _out(result.run_id)
    raise typer.Exit(result.exit_code)


@app.command("eval")
def eval_(
    run: Annotated[str, typer.Argument(help="Run id, unique prefix, run folder or 'latest'.")],
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    split: Annotated[str, typer.Option(help="val or test.")] = "val",
    device: Annotated[str, typer.Option(help="Device to evaluate on.")] = "auto",
    runs_dir: RunsDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate a run's checkpoint: loss, accuracy, per-class accuracy, confusion matrix."""
    if checkpoint not in ("best", "last"):
        raise KdlError(f"--checkpoint must be best or last, got {checkpoint!r}")
    if split not in ("val", "test"):
        raise KdlError(f"--split must be val or test, got {split!r}")
    from . import engine
    from .report import print_eval

    found, result = engine.evaluate_run(runs.runs_dir(runs_dir), run, checkpoint, split, device)
    if as_json:
        _out(json.dumps(result))
    else:
        print_eval(result)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: SetOption = None,
) -> None:
    """Print the fully resolved config, or every problem in it."""
    from .config import load_config

    cfg = load_config(config, list(set_ or []))
    _out(cfg.to_yaml().rstrip())


@app.command("runs")
def list_runs(runs_dir: RunsDir = None, as_json: JsonFlag = False) -> None:
    """List runs: id, status, name, model, dataset, epochs, best metric, duration."""
    from .report import print_runs, run_row

    rows = [run_row(run) for run in runs.iter_runs(runs.runs_dir(runs_dir))]
    if as_json:
        _out(json.dumps(rows))
    else:
        print_runs(rows)


@app.command()
def show(
    run: Annotated[str, typer.Argument(help="Run id, unique prefix, run folder or 'latest'.")],
    runs_dir: RunsDir = None,
) -> None:
    """Show a run: its config, environment and per-epoch metrics."""
    from .report import print_show

    print_show(runs.resolve_run(runs.runs_dir(runs_dir), run))


def main() -> None:
    app()
