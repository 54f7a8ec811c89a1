"""`kdl train`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import workers
from ..errors import KdlError
from ..runfolder.layout import run_ref
from ..runfolder.layout import runs_dir as runs_folder
from ..runfolder.reader import resolve_run
from .app import Command, ForceFlag, JsonFlag, RunsDir, SetOption, app, check_processes, echo


@app.command(cls=Command)
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
                           "id (waiting for one still training), resume an interrupted or crashed one.")
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
        Optional[str],  # noqa: UP045
        typer.Option(help="With --nnodes: address of the machine with --node-rank 0 (default 127.0.0.1)."),
    ] = None,
    master_port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="With --nnodes: a free port on it (default 29500; one machine: any free)."),
    ] = None,
    force: ForceFlag = False,
) -> None:
    """Train a model; prints the run id as the last line of stdout.

    Exit codes: 0 done (or skipped, or paused by --until-epoch), 1 the run failed, 2 bad usage/config/data,
    130 interrupted by SIGINT, 143 by SIGTERM (checkpoint saved; resume with --resume).
    """
    from ..plan import plan_train

    if config is None and resume is None:
        raise KdlError("give a CONFIG file to train, or --resume RUN to continue a run")
    if config is not None and resume is not None:
        raise KdlError("give either a CONFIG file or --resume RUN, not both")
    overrides = [*(set_ or []), *([f"name={name}"] if name is not None else []),
                 *([f"train.device={device}"] if device is not None else [])]
    root, tag = runs_folder(runs_dir), json.loads(trial) if trial else None
    given = nproc_per_node
    if node_rank >= nnodes:
        raise KdlError(f"--node-rank {node_rank} with --nnodes {nnodes}: the machines are numbered 0 to "
                       f"{nnodes - 1}, 0 being the one at --master-addr. Give each machine its own "
                       "number in that range, the same --nnodes on all")
    if resume is not None and nproc_per_node is None and not workers.in_worker():
        nproc_per_node = _processes_of(root, resume)  # a run resumes with as many processes
    if nproc_per_node is None:
        _no_launch_options(nnodes=nnodes != 1, node_rank=node_rank != 0, master_addr=master_addr is not None,
                           master_port=master_port is not None)
    # config and run references are checked before torch loads (seconds): mistakes answer at once;
    # a launcher of several processes checks them before any starts, and locks no run: of the
    # training processes, rank 0 locks the run it resumes (with --skip-existing the launcher,
    # of several machines the one of node 0, claims the config for them all)
    launching = nproc_per_node is not None and not workers.in_worker()
    if launching:  # (a resume given no count takes the run's own, chosen when it started)
        check_processes(nproc_per_node, "--nproc-per-node", force or given is None)
    plan = plan_train(str(config) if config else None, overrides, root, resume, allow_changes,
                      skip_existing, sweep, lock=not launching and workers.worker_rank() == 0,
                      until_epoch=until_epoch, trial=tag, claim=not workers.in_worker() and node_rank == 0,
                      say=_say)
    if launching:  # the same command for each process torchrun starts, less the launcher's options
        from .. import launcher

        worker = ["train", *([str(config)] if config else []),
                  *[item for s in overrides for item in ("--set", s)], "--runs-dir", str(root),
                  *(["--resume", resume] if resume else []), *(["--sweep", sweep] if sweep else []),
                  *(["--until-epoch", str(until_epoch)] if until_epoch else []),
                  *(["--trial", trial] if trial else []),
                  *[flag for flag, on in (("--allow-changes", allow_changes),
                                          ("--skip-existing", skip_existing), ("--quiet", quiet),
                                          ("--json", as_json)) if on]]
        os.environ[workers.LAUNCHED_AS] = json.dumps(workers.command_line(sys.argv[1:]))  # their record
        try:  # the processes train under the launcher's claim (--skip-existing)
            code = launcher.launch(worker, nproc_per_node, nnodes, node_rank, master_addr or "127.0.0.1",
                                   master_port)
        finally:
            plan.release()
        raise typer.Exit(code)
    from .. import session

    result = session.train(plan, root, command=workers.command_line(sys.argv[1:]), quiet=quiet)
    if result.rank == 0 and as_json:  # of several training processes, rank 0 reports
        echo(json.dumps({"id": result.run_id, "status": result.status, "skipped": result.skipped,
                        "folder": str(result.folder), "summary": result.summary}))
    elif result.rank == 0:
        echo(result.run_id)
    if workers.in_worker():
        from .. import distributed

        distributed.exit_worker(result.exit_code)
    raise typer.Exit(result.exit_code)


def _say(line: str) -> None:
    """A wait of --skip-existing, said even with --quiet: a command that waits says for what."""
    print(line, file=sys.stderr, flush=True)


def _no_launch_options(**given: bool) -> None:
    """Refuse torchrun's launch options without --nproc-per-node: without it kdl trains one
    process here, and machines told to train together would each train a run of their own."""
    named = [f"--{option.replace('_', '-')}" for option, on in given.items() if on]
    if named:
        raise KdlError(
            f"{' and '.join(named)} {'is an option' if len(named) == 1 else 'are options'} of a launch "
            "through torchrun, which --nproc-per-node N asks for (N: the training processes on this "
            "machine, one per GPU); without it this command trains one process, alone, here. Add "
            f"--nproc-per-node, or leave out {' and '.join(named)}"
        )


def _processes_of(root: Path, ref: str) -> int | None:
    """How many training processes torchrun started for the run to resume on one machine (it
    resumes with as many, exactly, through torchrun again: one included, a one-GPU DDP run);
    None for a run without torchrun. A run over several machines is resumed on each by hand."""
    run = resolve_run(root, ref)
    processes, nodes = run.meta.get("processes"), run.meta.get("nodes", 1)
    if not isinstance(processes, int) or processes < 1:
        return None
    if nodes != 1:
        raise KdlError(
            f"run {run.id} trained in {processes} processes on {nodes} machines: resume it on each "
            f"machine with kdl train --resume {run_ref(run.path)} --nproc-per-node "
            f"{processes // nodes} --nnodes {nodes} --node-rank N --master-addr HOST --master-port "
            "PORT (N: the machine's index, 0 on the one at HOST)"
        )
    return processes
