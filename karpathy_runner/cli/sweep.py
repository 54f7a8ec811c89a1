"""`kdl sweep`: a grid of points, or an adaptive search over a space, each point a `kdl train`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ..batch.launch import Launcher, check_available, parse_launcher
from ..errors import KdlError
from ..runfolder.layout import runs_dir as runs_folder
from .app import Command, ForceFlag, JsonFlag, RunsDir, SetOption, app, check_processes, echo

if TYPE_CHECKING:
    from ..batch.study import SearchSpec


@app.command(cls=Command)
def sweep(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file.")],
    grid: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="key=v1,v2: values of one key (repeatable; the product is run)."),
    ] = None,
    search: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="tpe|random|grid",
                     help="Adaptive search through Optuna over --space (default tpe)."),
    ] = None,
    space: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(metavar="KEY=DIST",
                     help="A searched key: uniform(a,b), loguniform(a,b), int(a,b) or "
                          "choice(v1,v2,...) (repeatable)."),
    ] = None,
    trials: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="--search: trials in the study (grid: default all its points)."),
    ] = None,
    metric: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="--search: the metric to optimise (default train.best_metric, in the "
                          "direction the task declares)."),
    ] = None,
    halving: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=2, metavar="ETA",
                     help="--search: successive halving; the best 1/ETA of the trials go on at "
                          "each rung."),
    ] = None,
    min_epochs: Annotated[
        int, typer.Option(min=1, help="--halving: epochs of the first rung.")
    ] = 1,
    storage: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="URL", help="--search: Optuna storage (default: an SQLite file in the "
                                         "runs folder); a shared database lets machines share a study."),
    ] = None,
    study: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="NAME", help="--search: the study's name (default: one made from the "
                                          "config and the search, so the same command continues it)."),
    ] = None,
    set_: SetOption = None,
    jobs: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Points run at the same time (default 1; with --launcher slurm or "
                                 "submitit-local, every point of a grid)."),
    ] = None,
    fail_fast: Annotated[bool, typer.Option(help="Stop the sweep at the first failed point.")] = False,
    skip_existing: Annotated[
        bool, typer.Option(help="Skip points already completed; resume interrupted ones.")
    ] = False,
    emit: Annotated[
        bool, typer.Option(help="Print one `kdl train` command per point instead of running them.")
    ] = False,
    launcher: Annotated[
        str, typer.Option(metavar="local|slurm|submitit-local",
                          help="Where points run: processes here (local), a Slurm job each "
                               "(slurm), or a submitit job each on this machine (submitit-local).")
    ] = "local",
    slurm_partition: Annotated[
        Optional[str], typer.Option(metavar="NAME", help="--launcher slurm: the partition.")  # noqa: UP045
    ] = None,
    slurm_gpus: Annotated[
        Optional[int], typer.Option(min=0, metavar="N", help="--launcher slurm: GPUs of each job.")  # noqa: UP045
    ] = None,
    slurm_time: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="TIME", help="--launcher slurm: each job's time limit, as sbatch --time "
                                          "takes it (90, 1:30:00, 2-00:00:00); default the partition's."),
    ] = None,
    slurm_cpus: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", help="--launcher slurm: CPU cores of each job.")  # noqa: UP045
    ] = None,
    slurm_setup: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(metavar="LINE", help="--launcher slurm: a shell line each job runs first, e.g. "
                                          "'module load cuda' (repeatable)."),
    ] = None,
    status: Annotated[
        bool, typer.Option("--status", help="Show the jobs this sweep submitted (same arguments): "
                                            "each point's job, its state, its run. Submits nothing.")
    ] = False,
    runs_dir: RunsDir = None,
    as_json: JsonFlag = False,
    force: ForceFlag = False,
) -> None:
    """Run the Cartesian product of --grid values, or an adaptive search over --space; prints
    the sweep (or study) id as the last stdout line.

    Each point or trial is a normal run tagged with the id (see `kdl runs --sweep`, `kdl compare
    --sweep`). A search's study lives on in its storage: the same command run again continues it.
    With --launcher slurm each point is a job, and so is the sweep's id: the same command run
    again waits for the jobs still queued or running, and submits the points not completed.
    Exit code 0 when every point completed (a search: no trial failed and one completed), 1
    otherwise, 130 if interrupted.
    """
    base = list(set_ or [])
    where = parse_launcher(launcher, slurm_partition, slurm_gpus, slurm_time, slurm_cpus, slurm_setup)
    _refuse_with_emit(emit, where.jobs, status)
    if not (emit or status or where.jobs):
        check_processes(jobs or 1, "--jobs", force)
    if search is not None or space or halving is not None:
        _refuse_grid_options(grid, skip_existing, emit)
        raise typer.Exit(_search(config, base, search or "tpe", space or [], trials, metric, halving,
                                 min_epochs, storage, study, jobs or 1, fail_fast, runs_dir, as_json,
                                 where, status))
    if not grid:
        raise KdlError("kdl sweep needs --grid key=v1,v2 (a grid), or --space KEY=DIST (a search)")
    for option, given in (("--trials", trials), ("--metric", metric), ("--storage", storage),
                          ("--study", study)):
        if given is not None:
            raise KdlError(f"{option} belongs to a search (--space, --search); a --grid sweep "
                           "runs every point once")
    from ..batch import sweep as sweeps

    root = runs_folder(runs_dir)
    if where.jobs or status:  # a job runs elsewhere: its paths are whole, and it resumes its run
        sweep_id, points = sweeps.plan_grid(config.absolute(), base, grid, root.absolute(), True,
                                            lasting=True)
        raise typer.Exit(_grid_jobs(config, base, sweep_id, points, root, where, jobs, fail_fast,
                                    as_json, status))
    sweep_id, points = sweeps.plan_grid(config, base, grid, runs_dir, skip_existing)
    if emit:
        echo(sweeps.emit(points))
        return
    log = _sweep_log(as_json)
    log(f"sweep {sweep_id}: {len(points)} points, {jobs or 1} at a time, runs in {root}")
    code = sweeps.Sweep(points, jobs or 1, fail_fast, log).run()
    _report(sweep_id, points, root, as_json)
    raise typer.Exit(code)


def _grid_jobs(config: Path, base: list[str], sweep_id: str, points: list, root: Path,
               where: Launcher, jobs: int | None, fail_fast: bool, as_json: bool,
               status: bool) -> int:
    """A grid whose points are jobs: submitted and waited for, or (--status) shown."""
    from ..batch import jobs as batch_jobs

    hashes = batch_jobs.config_hashes(config, base, points)
    if status:
        rows = batch_jobs.grid_status(points, hashes, sweep_id, root)
        _show_jobs(sweep_id, rows, list(points[0].values), as_json)
        return 0
    check_available(where)
    log = _sweep_log(as_json)
    log(f"sweep {sweep_id}: {len(points)} points as {where.name} jobs"
        + (f", {jobs} at a time" if jobs else "") + f"; runs in {root}")
    code = batch_jobs.run_grid(points, hashes, sweep_id, root, where, jobs, fail_fast, log)
    _report(sweep_id, points, root, as_json)
    return code


def _show_jobs(sweep_id: str, rows: list[dict], keys: list[str], as_json: bool) -> None:
    """--status: the table of the sweep's jobs on stdout (or one JSON object)."""
    from ..batch.jobs import print_status

    if as_json:
        echo(json.dumps({"sweep": sweep_id, "jobs": rows}))
    elif not rows:
        print(f"{sweep_id} has no jobs in this runs folder: it submits them with --launcher slurm "
              "or submitit-local", file=sys.stderr)
    else:
        print_status(rows, keys)


def _report(sweep_id: str, points: list, root: Path, as_json: bool) -> None:
    """The end of a grid: its table on stderr and its id on stdout, or one JSON object."""
    from ..batch import sweep as sweeps

    rows = sweeps.results(points, root)
    if as_json:
        echo(sweeps.to_json(sweep_id, rows))
    else:
        sweeps.print_summary(rows)
        echo(sweep_id)


def _refuse_with_emit(emit: bool, jobs: bool, status: bool) -> None:
    if emit and (jobs or status):
        raise KdlError("--emit prints each point's `kdl train` command instead of running it, so it "
                       f"takes no {'--status' if status else '--launcher'}: leave --emit out to "
                       "submit the points as jobs, or the launcher out to print the commands")


def _refuse_grid_options(grid: list[str] | None, skip_existing: bool, emit: bool) -> None:
    if grid:
        raise KdlError("give --grid for a grid sweep, or --space with --search for a search; "
                       "not both (a grid search is --search grid --space 'KEY=choice(...)')")
    if skip_existing:
        raise KdlError("--skip-existing belongs to --grid sweeps: a search's study already "
                       "knows its trials, and the same command continues it")
    if emit:
        raise KdlError(
            "--emit prints a grid's commands in advance, but an adaptive search chooses each "
            "trial's values from the results of the trials before it, so there is no list to "
            "print. Run the search itself (Ctrl-C stops it; the same command continues it), "
            "or give --grid to --emit a grid's commands."
        )


def _sweep_log(as_json: bool) -> Callable[[str], None]:
    return (lambda line: None) if as_json else (lambda line: print(line, file=sys.stderr, flush=True))


def _search(config: Path, base: list[str], search: str, space: list[str], trials: int | None,
            metric: str | None, halving: int | None, min_epochs: int, storage: str | None,
            study: str | None, jobs: int, fail_fast: bool, runs_dir: Path | None,
            as_json: bool, where: Launcher, status: bool) -> int:
    """`kdl sweep --search`: everything is checked before Optuna loads or any trial runs."""
    from ..batch import search as searches

    root = runs_folder(runs_dir)
    if where.jobs or status:  # a job runs elsewhere: its paths are whole
        config, root = config.absolute(), root.absolute()
    spec = searches.plan_search(config, base, search, space, trials, metric, halving, min_epochs)
    if status:
        from ..batch.jobs import trial_status

        name = study or spec.study_name()
        _show_jobs(name, trial_status(name, root), [d.key for d in spec.space], as_json)
        return 0
    if where.jobs:
        check_available(where)
    outcome = searches.run_search(spec, root, storage, study, jobs, fail_fast, _sweep_log(as_json),
                                  where)
    name = outcome.search.study_name
    if as_json:
        echo(json.dumps({"sweep": name, "study": name, "storage": outcome.storage,
                         "direction": spec.direction, "metric": spec.metric, "trials": outcome.rows,
                         "best": outcome.best}))
    else:
        _print_results(spec, outcome.rows, outcome.best)
        echo(name)
    return outcome.code


def _print_results(spec: SearchSpec, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """The end-of-search table and the best trial, on stderr (stdout keeps the study id)."""
    from rich.console import Console
    from rich.table import Table

    from ..batch.sweep import shown

    keys = [d.key for d in spec.space]
    table = Table(show_edge=False, header_style="bold")
    rung = spec.halving is not None
    for column in ["trial", *keys, "state", *(["rung"] if rung else []), "epochs",
                   spec.metric, "run"]:
        table.add_column(column)
    for row in rows:
        value = "-" if row["value"] is None else f"{row['value']:.4g}"
        style = "bold green" if best and row["trial"] == best["trial"] else (
            "red" if row["state"] == "fail" else None)
        table.add_row(str(row["trial"]), *(shown(row["params"].get(k, "-")) for k in keys),
                      row["state"], *([str(row.get("rung", "-"))] if rung else []),
                      str(row["epochs"]), value, row["run"] or "-", style=style)
    width = None if sys.stderr.isatty() else 200
    console = Console(stderr=True, highlight=False, width=width)
    console.print(table)
    if best is None:
        console.print("no trial completed")
        return
    values = " ".join(f"{k}={shown(v)}" for k, v in best["params"].items())
    console.print(f"best: trial {best['trial']}, {spec.metric} {best['value']:.4g} "
                  f"({values}), run {best['run']}")
