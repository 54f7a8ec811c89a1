"""`kdl export`: a run's model as a file that runs without kdl."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import KdlError
from ..runfolder import fsio
from ..runfolder.layout import runs_dir as runs_folder
from ..runfolder.reader import resolve_run
from .app import CheckpointOption, Command, RunArgument, RunsDir, app, check_checkpoint, echo

FORMATS = ("torchscript", "exported-program", "onnx")


@app.command("export", cls=Command)
def export(
    run: RunArgument,
    format_: Annotated[str, typer.Option("--format", help=f"{', '.join(FORMATS)}.")],
    checkpoint: CheckpointOption = "best",
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="File to write (default: the run's export/model-CHECKPOINT.pt, .pt2 "
                          "or .onnx)."),
    ] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Write a run's model with its input preparation (and vocabulary, class names) as
    TorchScript, a torch.export program or ONNX, and check the file's outputs against the eager
    model's on a batch of the data: a classifier, a GAN's generator, a VAE's decoder."""
    check_checkpoint(checkpoint)
    if format_ not in FORMATS:
        raise KdlError(f"--format {format_!r}: give one of {', '.join(FORMATS)}")
    if out is not None:
        fsio.check_output(out)  # before the model loads
    root = runs_folder(runs_dir)
    folder = str(resolve_run(root, run).path)  # a wrong RUN answers before torch loads
    from ..export import export_run

    done = export_run(root, folder, format_, checkpoint, out)
    if done.checked:
        print(f"max abs difference {done.difference:.3g} against the eager model on {done.count} "
              f"{done.examples}", file=sys.stderr)
    echo(str(done.path))
