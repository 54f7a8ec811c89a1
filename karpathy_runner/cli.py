"""The `kdl` command line: parse arguments, call the engine, print. Nothing else.

torch and pydantic are imported inside the commands that need them, so `kdl --help`,
`kdl runs` and `kdl show` start fast. Errors a user can fix print one paragraph and exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from . import __version__, runs, workers
from .errors import KdlError


class _Command(TyperCommand):
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
            print(f"error: {exc}", file=sys.stderr, flush=True)
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


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            torch = f"torch {version('torch')}"
        except PackageNotFoundError:
            torch = "torch not installed"
        _out(f"kdl {__version__} (python {sys.version.split()[0]}, {torch})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print kdl's version and exit.")] = False,
) -> None:
    """Run classic deep-learning experiments from YAML configs: CNNs on images, RNN/LSTM/GRU on
    sequences and text (classifiers and character language models), GANs."""


def _check_checkpoint(checkpoint: str) -> None:
    if checkpoint not in ("best", "last"):
        raise KdlError(f"--checkpoint must be best or last, got {checkpoint!r}")


def _out(text: str) -> None:
    """Results go to stdout; everything else (logs, progress) goes to stderr."""
    print(text, flush=True)


@app.command(cls=_Command)
def train(
    config: Annotated[Optional[Path], typer.Argument(metavar="CONFIG", help="YAML config file.")] = None,  # noqa: UP045
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
    skip_existing: Annotated[
        bool, typer.Option(help="Reuse a run of the same resolved config: print a completed one's "
                           "id, resume an interrupted or crashed one.")
    ] = False,
    sweep: Annotated[
        Optional[str], typer.Option(help="Tag the run as a point of sweep ID (its --set values).")  # noqa: UP045
    ] = None,
    until_epoch: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Pause after epoch N with a checkpoint (status paused), the run "
                                 "as it would be there trained straight through; --resume goes on."),
    ] = None,
    trial: Annotated[
        Optional[str], typer.Option(hidden=True, help="kdl sweep --search: the trial tag, as JSON.")  # noqa: UP045
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    as_json: JsonFlag = False,
    nproc_per_node: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Train data-parallel in N processes on this machine (one per GPU; "
                                 "gloo on the CPU), launched by torch.distributed.run."),
    ] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="With --nproc-per-node: machines in all.")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="With --nnodes: this machine's index.")] = 0,
    master_addr: Annotated[
        str, typer.Option(help="With --nnodes: address of the machine with --node-rank 0.")
    ] = "127.0.0.1",
    master_port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="With --nnodes: a free port on it (default 29500; one machine: any free)."),
    ] = None,
) -> None:
    """Train a model; prints the run id as the last line of stdout.

    Exit codes: 0 done (or skipped, or paused by --until-epoch), 1 the run failed, 2 bad usage/config/data,
    130 interrupted by SIGINT, 143 by SIGTERM (checkpoint saved; resume with --resume).
    """
    from .plan import plan_train

    overrides = list(set_ or [])
    if name is not None:
        overrides.append(f"name={name}")
    if device is not None:
        overrides.append(f"train.device={device}")
    if config is None and resume is None:
        raise KdlError("give a CONFIG file to train, or --resume RUN to continue a run")
    if config is not None and resume is not None:
        raise KdlError("give either a CONFIG file or --resume RUN, not both")
    root = runs.runs_dir(runs_dir)
    tag = json.loads(trial) if trial else None
    if nproc_per_node is not None and not workers.in_worker():
        # the config and the run to resume are checked here, before any process starts
        plan_train(str(config) if config else None, overrides, root, resume, allow_changes,
                   skip_existing, sweep, lock=False, until_epoch=until_epoch, trial=tag)
        worker = ["train", *([str(config)] if config else []),
                  *[item for s in overrides for item in ("--set", s)], "--runs-dir", str(root),
                  *(["--resume", resume] if resume else []), *(["--sweep", sweep] if sweep else []),
                  *(["--until-epoch", str(until_epoch)] if until_epoch else []),
                  *(["--trial", trial] if trial else []),
                  *[flag for flag, on in (("--allow-changes", allow_changes),
                                          ("--skip-existing", skip_existing), ("--quiet", quiet),
                                          ("--json", as_json)) if on]]
        from . import distributed

        raise typer.Exit(distributed.launch(worker, nproc_per_node, nnodes, node_rank, master_addr,
                                            master_port))
    # config and run references are checked before torch loads (seconds): mistakes answer at once;
    # of several training processes only rank 0 locks the run it resumes
    plan = plan_train(str(config) if config else None, overrides, root, resume, allow_changes,
                      skip_existing, sweep, lock=workers.worker_rank() == 0,
                      until_epoch=until_epoch, trial=tag)
    from . import engine

    result = engine.train(plan, root, command=["kdl", *sys.argv[1:]], quiet=quiet)
    if result.rank == 0 and as_json:  # of several training processes, rank 0 reports
        _out(json.dumps({"id": result.run_id, "status": result.status, "skipped": result.skipped,
                         "folder": str(result.folder), "summary": result.summary}))
    elif result.rank == 0:
        _out(result.run_id)
    if workers.in_worker():
        from . import distributed

        distributed.exit_worker(result.exit_code)
    raise typer.Exit(result.exit_code)



@app.command("eval", cls=_Command)
def eval_(
    run: Annotated[
        str, typer.Argument(metavar="RUN", help="Run id, unique prefix, run folder or 'latest'.")
    ],
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
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
    _check_checkpoint(checkpoint)
    if split not in ("val", "test"):
        raise KdlError(f"--split must be val or test, got {split!r}")
    root = runs.runs_dir(runs_dir)
    folder = str(runs.resolve_run(root, run).path)  # a wrong RUN answers before torch loads
    from . import engine
    from .report import print_eval

    _, result = engine.evaluate_run(root, folder, checkpoint, split, device, features)
    if as_json:
        _out(json.dumps(result))
    else:
        print_eval(result)


@app.command(cls=_Command)
def sample(
    run: Annotated[
        str, typer.Argument(metavar="RUN", help="Run id, unique prefix, run folder or 'latest'.")
    ],
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
    seed: Annotated[int, typer.Option(help="Seed of the draw: the same seed, the same sample.")] = 0,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="File to write (images default to the run's samples/ folder)."),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    device: Annotated[str, typer.Option(help="Device to sample on.")] = "auto",
    runs_dir: RunsDir = None,
) -> None:
    """Draw from a generative run: text is printed; an image grid is written and its path printed."""
    _check_checkpoint(checkpoint)
    root = runs.runs_dir(runs_dir)
    folder = str(runs.resolve_run(root, run).path)  # a wrong RUN answers before torch loads
    from . import engine
    from .tasks import SampleRequest

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    request = SampleRequest(seed=seed, n=n, length=length, temperature=temperature, top_k=top_k,
                            prime=prime)
    sample, path = engine.sample_run(root, folder, request, checkpoint, out, device)
    _out(sample.text if sample.images is None else str(path))


@app.command(cls=_Command)
def predict(
    run: Annotated[
        str, typer.Argument(metavar="RUN", help="Run id, unique prefix, run folder or 'latest'.")
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(metavar="INPUT...", help="Image files or folders (image classifiers); texts, "
                                                "or files of one text per line (text classifiers)."),
    ],
    top_k: Annotated[int, typer.Option(min=1, help="Show the K likeliest classes.")] = 1,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    device: Annotated[str, typer.Option(help="Device to predict on.")] = "auto",
    runs_dir: RunsDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Classify new images or texts with a classification run, through its own preprocessing
    and vocabulary: one line per input with its likeliest classes and their probabilities."""
    _check_checkpoint(checkpoint)
    from .predict import predict_run

    found, predictions = predict_run(runs.runs_dir(runs_dir), run, inputs, top_k, checkpoint, device)
    if as_json:
        _out(json.dumps({"run": found.id, "checkpoint": checkpoint, "predictions": [
            {"input": p.input, "classes": [{"class": name, "probability": round(prob, 6)}
                                           for name, prob in p.classes]} for p in predictions]}))
        return
    for p in predictions:
        _out("\t".join([p.input, *(f"{name} {prob:.3f}" for name, prob in p.classes)]))


@app.command(cls=_Command)
def validate(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file.")],
    set_: SetOption = None,
) -> None:
    """Print the fully resolved config, or every problem in it."""
    from .config import load_config

    cfg = load_config(config, list(set_ or []))
    _out(cfg.to_yaml().rstrip())


@app.command(cls=_Command)
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
    jobs: Annotated[int, typer.Option(min=1, help="Points run at the same time.")] = 1,
    fail_fast: Annotated[bool, typer.Option(help="Stop the sweep at the first failed point.")] = False,
    skip_existing: Annotated[
        bool, typer.Option(help="Skip points already completed; resume interrupted ones.")
    ] = False,
    emit: Annotated[
        bool, typer.Option(help="Print one `kdl train` command per point instead of running them.")
    ] = False,
    runs_dir: RunsDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the Cartesian product of --grid values, or an adaptive search over --space; prints
    the sweep (or study) id as the last stdout line.

    Each point or trial is a normal run tagged with the id (see `kdl runs --sweep`, `kdl compare
    --sweep`). A search's study lives on in its storage: the same command run again continues it.
    Exit code 0 when every point completed (a search: no trial failed and one completed), 1
    otherwise, 130 if interrupted.
    """
    from . import sweep as sweeps
    from .config import load_config

    base = list(set_ or [])
    adaptive = search is not None or space or halving is not None
    if adaptive:
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
        raise typer.Exit(_search(config, base, search or "tpe", space or [], trials, metric,
                                 halving, min_epochs, storage, study, jobs, fail_fast, runs_dir,
                                 as_json))
    if not grid:
        raise KdlError("kdl sweep needs --grid key=v1,v2 (a grid), or --space KEY=DIST (a search)")
    for option, given in (("--trials", trials), ("--metric", metric), ("--storage", storage),
                          ("--study", study)):
        if given is not None:
            raise KdlError(f"{option} belongs to a search (--space, --search); a --grid sweep "
                           "runs every point once")
    values = sweeps.grid_points(sweeps.parse_grid(grid))
    load_config(config, base)  # the config and its --set values first: their errors are theirs
    for point in values:  # then every point's, before anything runs: its errors are the grid's
        sweeps.check_point(config, base, point)
    sweep_id = sweeps.new_sweep_id()
    root = runs.runs_dir(runs_dir)
    points = [
        sweeps.Point(i, point, sweeps.train_argv(str(config), base + sweeps.point_sets(point),
                                                 sweep_id, str(runs_dir) if runs_dir else None,
                                                 skip_existing))
        for i, point in enumerate(values)
    ]
    if emit:
        _out(sweeps.emit(points))
        return
    log = _sweep_log(as_json)
    log(f"sweep {sweep_id}: {len(points)} points, {jobs} at a time, runs in {root}")
    code = sweeps.Sweep(points, jobs, fail_fast, log).run()
    rows = sweeps.results(points, root)
    if as_json:
        _out(sweeps.to_json(sweep_id, rows))
    else:
        sweeps.print_summary(rows)
        _out(sweep_id)
    raise typer.Exit(code)


def _sweep_log(as_json: bool) -> Any:
    return (lambda line: None) if as_json else (lambda line: print(line, file=sys.stderr, flush=True))


def _search(config: Path, base: list[str], search: str, space_items: list[str], trials: int | None,
            metric: str | None, halving: int | None, min_epochs: int, storage: str | None,
            study_name: str | None, jobs: int, fail_fast: bool, runs_dir: Path | None,
            as_json: bool) -> int:
    """`kdl sweep --search`: everything is checked before Optuna loads or any trial runs."""
    from . import search as searches
    from .config import load_config

    if search not in searches.SEARCHES:
        raise KdlError(f"--search must be one of {', '.join(searches.SEARCHES)}; got {search!r}")
    space = searches.parse_space(space_items)
    if metric is not None:
        base = [*base, f"train.best_metric={metric}"]
    cfg = load_config(config, base)
    searches.check_space(config, base, space)
    metric_name, direction = searches.metric_direction(cfg)
    if search == "grid":
        size = 1
        for dimension in space:
            size *= len(dimension.grid())
        if trials is not None and trials > size:
            raise KdlError(f"--trials {trials}: the grid has only {size} points")
        trials = trials or size
    if trials is None:
        raise KdlError(f"--search {search} needs --trials N: how many trials the study runs")
    if halving is not None and min_epochs >= cfg.train.epochs:
        raise KdlError(f"--min-epochs {min_epochs}: the first rung must train fewer epochs than "
                       f"train.epochs ({cfg.train.epochs}), or there is nothing to halve")
    spec = searches.SearchSpec(config, base, space, search, trials, metric_name, direction,
                               cfg.hash(), cfg.name, halving, min_epochs, cfg.train.epochs)
    root = runs.runs_dir(runs_dir)
    name = study_name or spec.study_name()
    url = storage or searches.default_storage(root)
    log = _sweep_log(as_json)
    with searches.study_lock(root, name):
        study = searches.open_study(spec, url, name, cfg.seed)
        done = len(study.get_trials(deepcopy=False))
        rungs = f", halving by {halving} over epochs {spec.rungs()}" if halving else ""
        log(f"study {name}: {search} search, {done} of {trials} trials so far, {jobs} at a time"
            f"{rungs}; {direction} {metric_name}; storage {url}")
        runner = searches.Search(spec, study, name, root, jobs, log, fail_fast)
        code = runner.halve() if halving else runner.run()
        rows = runner.results()
        best = runner.best(rows)
    if as_json:
        _out(json.dumps({"sweep": name, "study": name, "storage": url, "direction": direction,
                         "metric": metric_name, "trials": rows, "best": best}))
    else:
        searches.print_results(runner, rows, best)
        _out(name)
    return 1 if code == 0 and best is None else code


@app.command("runs", cls=_Command)
def list_runs(
    runs_dir: RunsDir = None,
    status: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(metavar="STATUS",
                     help="Only runs with this status: running, completed, paused, failed, interrupted or "
                          "crashed (repeatable: any of them)."),
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
    from .compare import query_runs
    from .report import ordering_rows, print_csv, print_runs

    if as_json and as_csv:
        raise KdlError("choose one of --json and --csv")
    ordering = query_runs(runs.runs_dir(runs_dir), status, name, sweep, where, sort, limit)
    rows, extra = ordering_rows(ordering)
    if as_json:
        _out(json.dumps(rows))
    elif as_csv:
        print_csv(rows)
    else:
        print_runs(rows, extra)


@app.command(cls=_Command)
def show(
    run: Annotated[
        str, typer.Argument(metavar="RUN", help="Run id, unique prefix, run folder or 'latest'.")
    ],
    runs_dir: RunsDir = None,
) -> None:
    """Show a run: its config, environment, per-epoch metrics and a chart of its best metric."""
    from .report import print_show

    print_show(runs.resolve_run(runs.runs_dir(runs_dir), run))


@app.command("rm", cls=_Command)
def remove(
    run_refs: Annotated[
        list[str], typer.Argument(metavar="RUN...", help="Run ids, unique prefixes, run folders or 'latest'.")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Delete run folders; asks first unless --yes, and refuses a run that is still running."""
    import shutil

    found = runs.resolve_runs(runs.runs_dir(runs_dir), run_refs)
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
        with runs.RunLock(run.path).acquire():  # not while another process writes it
            shutil.rmtree(run.path)
        _out(f"removed {run.id}")


@app.command("compare", cls=_Command)
def compare_runs(
    run_refs: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(metavar="RUN...", help="Run ids, unique prefixes, run folders or 'latest'."),
    ] = None,
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
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the table as CSV.")] = False,
) -> None:
    """Compare runs: the config keys that differ, final and best metrics; the best row in green."""
    import dataclasses

    from . import compare
    from .report import print_comparison, print_csv

    if as_json and as_csv:
        raise KdlError("choose one of --json and --csv")
    found = _runs_or_sweep(run_refs, sweep, runs_dir, "compare")
    comparison = compare.compare([compare.run_record(run) for run in found], group_by)
    if as_json:
        _out(json.dumps(dataclasses.asdict(comparison)))
    elif as_csv:
        print_csv(compare.flat_rows(comparison))
    else:
        print_comparison(comparison)


@app.command(cls=_Command)
def plot(
    run_refs: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(metavar="RUN...", help="Run ids, unique prefixes, run folders or 'latest'."),
    ] = None,
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
    from .compare import best_metric_name
    from .plot import plot_runs

    found = _runs_or_sweep(run_refs, sweep, runs_dir, "plot")
    _out(str(plot_runs(found, metric or best_metric_name(found[0]), out, log_y, color_by)))


def _runs_or_sweep(run_refs: list[str] | None, sweep: str | None, runs_dir: Path | None,
                   verb: str) -> list[runs.Run]:
    """The runs named on the command line, or all runs of --sweep ID: one of the two."""
    from .compare import sweep_runs

    if bool(run_refs) == bool(sweep):
        raise KdlError(f"give run ids to {verb}, or --sweep ID (not both)")
    root = runs.runs_dir(runs_dir)
    return runs.resolve_runs(root, run_refs) if run_refs else sweep_runs(root, sweep)


def main() -> None:
    app()
