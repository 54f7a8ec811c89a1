"""`kdl runs`, `kdl show`, `kdl rm`, `kdl compare`, `kdl plot`: reading run folders, many at a time.
No torch and no pydantic: these answer at once."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import KdlError
from ..runfolder import fsio, layout
from ..runfolder.layout import runs_dir as runs_folder
from ..runfolder.locks import RunLock
from ..runfolder.reader import (
    Run,
    best_metric_name,
    current_best,
    not_removable,
    resolve_run,
    resolve_runs,
)
from ..ui.progress import format_metrics
from ..ui.tables import epoch_table, metric_chart, number, rich_console
from .app import RUNS_HELP, Command, CsvFlag, JsonFlag, RunArgument, RunsArgument, RunsDir, app, echo


@app.command("runs", cls=Command)
def list_runs(
    runs_dir: RunsDir = None,
    status: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(metavar="STATUS",
                     help="Only runs with this status: running, completed, paused, pruned (a search's "
                          "halving stopped it), failed, interrupted or crashed (repeatable: any of "
                          "them)."),
    ] = None,
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="PATTERN", help="Only runs whose name matches this glob, e.g. 'cifar*'."),
    ] = None,
    sweep: Annotated[
        Optional[str], typer.Option(metavar="ID", help="Only the runs of this sweep id.")  # noqa: UP045
    ] = None,
    where: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(metavar="KEY=VALUE",
                     help="Only runs where a config or meta.json key has this value, read as YAML: "
                          "--where optimizer.lr=0.1, --where status=failed (repeatable: all hold)."),
    ] = None,
    sort: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="KEY",
                     help="Order by a final metric (val.accuracy, train.loss), 'best', a config key "
                          "(optimizer.lr) or a column (id, name, status, model, dataset, epochs, "
                          "duration, created). Metrics go best first: accuracy descending, loss "
                          "ascending; everything else ascending. A leading '-' reverses: "
                          "--sort=-duration. Runs without the value come last."),
    ] = None,
    limit: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Show N runs: the first N of --sort, else the N newest."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of runs.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the runs as CSV.")] = False,
) -> None:
    """List runs: id, status, name, model, dataset, epochs, best metric, duration (oldest first)."""
    from ..batch.query import ordering_rows, query_runs
    from ..ui.tables import print_csv, print_runs

    if as_json and as_csv:
        raise KdlError("choose one of --json and --csv")
    ordering = query_runs(runs_folder(runs_dir), status, name, sweep, where, sort, limit)
    rows, extra = ordering_rows(ordering)
    if as_json:
        echo(json.dumps(rows))
    elif as_csv:
        print_csv(rows)
    else:
        print_runs(rows, extra)


@app.command(cls=Command)
def show(
    run: RunArgument,
    runs_dir: RunsDir = None,
) -> None:
    """Show a run: its config, environment, per-epoch metrics and a chart of its best metric."""
    print_show(resolve_run(runs_folder(runs_dir), run))


@app.command("rm", cls=Command)
def remove(
    run_refs: Annotated[list[str], typer.Argument(metavar="RUN...", help=RUNS_HELP)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Delete run folders; asks first unless --yes, and refuses a run that is still running."""
    import shutil

    root = runs_folder(runs_dir)
    found = resolve_runs(root, run_refs)
    for run in found:
        why = not_removable(run, root)
        if why:
            raise KdlError(f"{run.path} {why}: kdl rm removes only kdl runs, the folders kdl train "
                           f"made in the runs folder ({root}; --runs-dir or KDL_RUNS_DIR chooses "
                           "it). Delete anything else yourself. Nothing was removed.")
    running = [run.id for run in found if run.status == "running"]
    if running:
        raise KdlError(
            f"{', '.join(running)} is still running; stop it first (Ctrl-C, or kill the pid in its "
            "meta.json), then remove it. Nothing was removed."
        )
    if not yes:
        for run in found:
            print(f"  {run.path}", file=sys.stderr)
        try:
            answer = typer.confirm(f"Remove {len(found)} run folder(s)?", err=True)
        except typer.Abort:  # stdin closed: nobody answered
            raise KdlError("no answer to the prompt (stdin is closed): nothing removed; pass --yes "
                           "to remove without asking") from None
        if not answer:  # declining is an answer, not a failure: exit 0
            print("nothing removed", file=sys.stderr, flush=True)
            return
    for run in found:
        with RunLock(run.path).acquire():  # not while another process writes it
            shutil.rmtree(run.path)
        echo(f"removed {run.id}")


@app.command("compare", cls=Command)
def compare_runs(
    run_refs: RunsArgument = None,
    sweep: Annotated[
        Optional[str], typer.Option(metavar="ID", help="Compare all runs of this sweep id.")  # noqa: UP045
    ] = None,
    group_by: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(metavar="KEY",
                     help="Config key to group by, e.g. optimizer.lr (repeatable): one row per group "
                          "with mean ± sample std and n over the rest (the seeds)."),
    ] = None,
    runs_dir: RunsDir = None,
    as_json: JsonFlag = False,
    as_csv: CsvFlag = False,
) -> None:
    """Compare runs: the config keys that differ, final and best metrics; the best row in green."""
    import dataclasses

    from ..batch import query
    from ..ui.tables import print_comparison, print_csv

    if as_json and as_csv:
        raise KdlError("choose one of --json and --csv")
    found, how = _runs_or_sweep(run_refs, sweep, runs_dir, "compare")
    comparison = query.compare([query.run_record(run, how.get(run.id)) for run in found], group_by)
    if as_json:
        echo(json.dumps(dataclasses.asdict(comparison)))
    elif as_csv:
        print_csv(query.flat_rows(comparison))
    else:
        print_comparison(comparison)


@app.command(cls=Command)
def plot(
    run_refs: RunsArgument = None,
    sweep: Annotated[
        Optional[str], typer.Option(metavar="ID", help="Draw all runs of this sweep id.")  # noqa: UP045
    ] = None,
    metric: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="SPLIT.KEY",
                     help="What to draw: val.loss, val.accuracy, train.loss, train_epoch.loss... "
                          "(default: the first run's best metric)."),
    ] = None,
    log_y: Annotated[bool, typer.Option("--log-y", help="A logarithmic y axis.")] = False,
    color_by: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="KEY", help="Config key whose values get one colour family each "
                                         "(default: the first differing key other than seed)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("curves.png"),
    runs_dir: RunsDir = None,
) -> None:
    """Draw the learning curves of runs on one figure (PNG); prints the file written. The legend
    names the config keys that differ between the runs."""
    from ..runfolder import fsio
    from ..ui.plot import plot_runs

    fsio.check_output(out)  # before the runs are read
    found, _ = _runs_or_sweep(run_refs, sweep, runs_dir, "plot")
    png, note = plot_runs(found, metric or best_metric_name(found[0]), log_y, color_by)
    written = fsio.write_output(out, png)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    echo(str(written))


def _runs_or_sweep(run_refs: list[str] | None, sweep: str | None, runs_dir: Path | None,
                   verb: str) -> tuple[list[Run], dict[str, str]]:
    """The runs named on the command line, or all runs of --sweep ID (one of the two); for a
    sweep, also how it has each run: made, reused or resumed."""
    from ..batch.query import sweep_runs

    if bool(run_refs) == bool(sweep):
        raise KdlError(f"give run ids to {verb}, or --sweep ID (not both)")
    root = runs_folder(runs_dir)
    return (resolve_runs(root, run_refs), {}) if run_refs else sweep_runs(root, sweep)


ENV_KEYS = ("status", "created_at", "ended_at", "duration_s", "command", "host", "device",
            "config_hash", "git_commit", "python")


def print_show(run: Run) -> None:
    console = rich_console()
    meta = run.meta
    console.print(f"[bold]{run.id}[/bold]  {run.path}")
    console.print("\n[bold]config[/bold]")
    config = run.path / layout.CONFIG
    try:  # a regular file only: a FIFO there would wait for a writer
        text = fsio.read_bytes(config).decode("utf-8", errors="replace")
    except OSError:
        text = ""
    console.print(text.rstrip(), markup=False)
    console.print("\n[bold]environment[/bold]")
    env = {k: meta.get(k) for k in ENV_KEYS} | dict(meta.get("versions") or {})
    env["status"] = run.status
    for key, value in env.items():
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        console.print(f"  {key}: {shown}", markup=False)
    records = run.metrics()
    console.print("\n[bold]metrics per epoch[/bold]")
    console.print(epoch_table(records))
    metric = best_metric_name(run)
    console.print(f"\n[bold]{metric}[/bold]")
    console.print("\n".join(metric_chart(records, metric)), markup=False)
    summary, best = run.summary(), current_best(run)
    if summary or best.get("epoch") is not None:  # (a run that trains: its best so far)
        if best.get("metric"):
            console.print(f"\nbest {best['metric']} = {number(best.get('value'))} "
                          f"at epoch {best.get('epoch')}", markup=False)
        else:  # a GAN's: no metric of training tells which epoch was best
            console.print(f"\nno best metric: best.pt is the latest epoch's ({best.get('epoch')})",
                          markup=False)
        for split, result in (summary.get("eval") or {}).items():
            console.print(f"eval {split} ({result.get('checkpoint')}.pt, epoch {result.get('epoch')}): "
                          f"{format_metrics(result.get('metrics') or {})}", markup=False)
    run.config_dict()  # its problems too
    if run.damage:
        console.print(f"\ndamaged: {run.damage}", markup=False)
