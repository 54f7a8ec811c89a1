"""`kdl eval`, `kdl sample`, `kdl predict`, `kdl validate`: what one run or one config gives."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import KdlError
from ..runfolder import fsio
from ..runfolder.layout import runs_dir as runs_folder
from ..runfolder.reader import resolve_run
from .app import (
    CheckpointOption,
    Command,
    JsonFlag,
    RunArgument,
    RunsDir,
    SetOption,
    app,
    check_checkpoint,
    echo,
)


@app.command("eval", cls=Command)
def eval_(
    run: RunArgument,
    checkpoint: CheckpointOption = "best",
    split: Annotated[str, typer.Option(help="val or test.")] = "val",
    device: Annotated[str, typer.Option(help="Device to evaluate on.")] = "auto",
    features: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="RUN", help="GAN runs: score samples in this classification run's "
                                         "feature space (default: Inception-v3, if cached)."),
    ] = None,
    runs_dir: RunsDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate a run's checkpoint with its task's metrics: accuracy, per-class accuracy and the
    confusion matrix; bits per char; a GAN's Frechet distance, classifier score and coverage."""
    check_checkpoint(checkpoint)
    if split not in ("val", "test"):
        raise KdlError(f"--split must be val or test, got {split!r}")
    root = runs_folder(runs_dir)
    folder = str(resolve_run(root, run).path)  # a wrong RUN answers before torch loads
    from ..evaluate import evaluate_run
    from ..ui.tables import print_eval

    _, result = evaluate_run(root, folder, checkpoint, split, device, features)
    if as_json:
        echo(json.dumps(result))
    else:
        print_eval(result)


@app.command(cls=Command)
def sample(
    ctx: typer.Context,
    run: RunArgument,
    n: Annotated[int, typer.Option("-n", min=1, help="Images: how many to draw.")] = 64,
    length: Annotated[int, typer.Option(min=0, help="Text: characters to generate.")] = 500,
    temperature: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0.01,
                     help="Text: below 1 safer, above 1 wilder (default: task.sample_temperature)."),
    ] = None,
    top_k: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Text: draw only from the k likeliest characters."),
    ] = None,
    prime: Annotated[
        Optional[str], typer.Option(help="Text: start from this text.")  # noqa: UP045
    ] = None,
    seed: Annotated[int, typer.Option(min=-(2**63), max=2**63 - 1,
                                      help="Seed of the draw: the same seed, the same sample.")] = 0,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="File to write (images default to the run's samples/ folder)."),
    ] = None,
    checkpoint: CheckpointOption = "best",
    device: Annotated[str, typer.Option(help="Device to sample on.")] = "auto",
    runs_dir: RunsDir = None,
) -> None:
    """Draw from a generative run: text is printed; an image grid is written and its path printed."""
    check_checkpoint(checkpoint)
    if temperature is not None and not math.isfinite(temperature):  # the range lets nan through
        raise KdlError(f"--temperature {temperature}: give a finite number from 0.01 up (below 1 "
                       "safer, above 1 wilder), e.g. --temperature 0.8")
    root = runs_folder(runs_dir)
    folder = str(resolve_run(root, run).path)  # a wrong RUN answers before torch loads
    from ..evaluate import sample_run
    from ..tasks import SAMPLE_FLAGS, SampleRequest

    if out is not None:
        fsio.check_output(out)  # before the model loads
    given = frozenset(name for name in SAMPLE_FLAGS if _given(ctx, name))
    request = SampleRequest(seed=seed, n=n, length=length, temperature=temperature, top_k=top_k,
                            prime=prime, given=given, stream=_printed)
    drawn, paths = sample_run(root, folder, request, checkpoint, out, device)
    # text was printed as it was drawn; images: the files written, one per line
    echo("" if drawn.images is None else "\n".join(str(path) for path in paths))


def _printed(piece: str) -> None:
    """A piece of drawn text, printed at once: a long sample shows as it is drawn."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def _given(ctx: typer.Context, name: str) -> bool:
    """Was option `name` set on the command line (not left at its default)?"""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


@app.command(cls=Command)
def predict(
    ctx: typer.Context,
    run: RunArgument,
    inputs: Annotated[
        list[str],
        typer.Argument(metavar="INPUT...", help="Image files or folders (image classifiers, "
                                                "segmentations); texts, or files of one text per line "
                                                "(text classifiers)."),
    ],
    top_k: Annotated[int, typer.Option(min=1, help="Classifiers: show the K likeliest classes.")] = 1,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(metavar="DIR", help="Folder for the files predictions write (a segmentation's "
                                         "masks as PNG); default: predictions/RUN_ID."),
    ] = None,
    checkpoint: CheckpointOption = "best",
    device: Annotated[str, typer.Option(help="Device to predict on.")] = "auto",
    runs_dir: RunsDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Predict for new images or texts with a run, through its own preprocessing and vocabulary:
    one line per input, with a classifier's likeliest classes and their probabilities, or the
    mask file a segmentation wrote and the share of each class in it."""
    check_checkpoint(checkpoint)
    from ..predict import predict_run
    from ..tasks import PREDICT_FLAGS

    given = frozenset(name for name in PREDICT_FLAGS if _given(ctx, name))
    found, predictions = predict_run(runs_folder(runs_dir), run, inputs, top_k, checkpoint, device,
                                     out, given)
    if as_json:
        echo(json.dumps({"run": found.id, "checkpoint": checkpoint, "predictions": [
            {"input": p.input, **p.record} for p in predictions]}))
        return
    for p in predictions:
        echo("\t".join([p.input, *p.fields]))


@app.command(cls=Command)
def validate(
    config: Annotated[Optional[Path], typer.Argument(metavar="CONFIG", help="YAML config file.")] = None,  # noqa: UP045
    set_: SetOption = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Print the config reference instead: every key of every "
                                               "family, as Markdown (docs/config.md).")
    ] = False,
) -> None:
    """Print the fully resolved config, or every problem in it; with --reference, every key a
    config can have."""
    if reference:
        if config is not None or set_:
            raise KdlError("--reference prints every key of every family and takes no CONFIG or --set; "
                           "give CONFIG (and --set) or --reference, not both")
        from ..config.reference import markdown

        echo(markdown().removesuffix("\n"))
        return
    if config is None:
        raise KdlError("give a CONFIG file to validate, e.g. kdl validate configs/digits_cnn.yaml, or "
                       "--reference for every key a config can have")
    from ..config.loading import load_config

    cfg = load_config(config, list(set_ or []))
    echo(cfg.to_yaml().rstrip())
