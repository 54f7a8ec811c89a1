"""Where a sweep's points run (`kdl sweep --launcher`): `local`, processes on this machine (the
pool of sweep.py); `slurm`, a Slurm job each through submitit; `submitit-local`, a submitit job
each on this machine, which takes the cluster's path (the pickled job, its folder, `--status`,
resubmission) without a cluster, to try a cluster setup first.

Every option is checked here, before anything is submitted; `executor` is the one place that
chooses submitit's executor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KdlError, quoted

LAUNCHERS = ("local", "slurm", "submitit-local")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
TIME_PATTERN = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
TIME_FORMS = "minutes (90), H:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00), as sbatch --time takes it"
# submitit's local jobs are stopped after timeout_min (2 by default); a local job with no
# --slurm-time has no limit: ten years, in minutes
NO_LIMIT_MIN = 10 * 365 * 24 * 60
INSTALL = "pip install 'karpathy-runner[slurm]'"


@dataclass(frozen=True)
class Launcher:
    """A `--launcher` and its `--slurm-*` options, checked."""

    name: str = "local"
    partition: str | None = None
    gpus: int | None = None
    time_min: int | None = None  # None: the partition's default time limit
    cpus: int | None = None
    setup: tuple[str, ...] = ()

    @property
    def jobs(self) -> bool:
        """Does each point run as a submitit job (not a process of this command)?"""
        return self.name != "local"


def parse_launcher(name: str, partition: str | None, gpus: int | None, time: str | None,
                   cpus: int | None, setup: list[str] | None) -> Launcher:
    """The launcher the options ask for; a value Slurm would refuse, or an option the launcher
    has no use for, is an error naming the option."""
    if name not in LAUNCHERS:
        raise KdlError(f"--launcher {quoted(name)} is not a launcher; use one of {', '.join(LAUNCHERS)}")
    given = {"--slurm-partition": partition, "--slurm-gpus": gpus, "--slurm-time": time,
             "--slurm-cpus": cpus, "--slurm-setup": setup or None}
    # on this machine a partition and a CPU count have no meaning; the rest mean the same
    kept = {"slurm": tuple(given), "submitit-local": ("--slurm-gpus", "--slurm-time", "--slurm-setup"),
            "local": ()}[name]
    for option, value in given.items():
        if value is not None and option not in kept:
            raise KdlError(f"{option} is an option of --launcher slurm"
                           + (" (submitit-local takes --slurm-gpus, --slurm-time and --slurm-setup)"
                              if name == "submitit-local" else "")
                           + f"; this sweep's launcher is {name}. Add --launcher slurm, or leave "
                           f"{option} out")
    if partition is not None and not re.fullmatch(r"[^\s,]+(,[^\s,]+)*", partition):
        raise KdlError(f"--slurm-partition {quoted(partition)} is not a partition name; give one "
                       "as sinfo lists it, e.g. --slurm-partition gpu (several: gpu,cpu)")
    for line in setup or []:
        if not line.strip() or "\n" in line or "\r" in line:
            raise KdlError(f"--slurm-setup {quoted(line)}: give one shell line per --slurm-setup, "
                           "e.g. --slurm-setup 'module load cuda' --slurm-setup 'source .venv/bin/activate'")
    return Launcher(name, partition, gpus, parse_time(time) if time is not None else None, cpus,
                    tuple(setup or ()))


def parse_time(text: str) -> int:
    """`--slurm-time` in whole minutes (seconds round up), from any form sbatch --time takes."""
    found = TIME_PATTERN.fullmatch(text.strip())
    if found is None:
        raise KdlError(f"--slurm-time {quoted(text)} is not a time limit; write {TIME_FORMS}")
    days, first, *rest = found.groups()
    fields = [int(first), *(int(f) for f in rest if f is not None)]
    if days is None:  # M, M:S or H:M:S
        units = {1: [60], 2: [60, 1], 3: [3600, 60, 1]}[len(fields)]
    else:  # D-H, D-H:M or D-H:M:S
        units = [3600, 60, 1][: len(fields)]
    leading_limit = 24 if days is not None else None
    if any(f >= 60 for f in fields[1:]) or (leading_limit and fields[0] >= leading_limit):
        raise KdlError(f"--slurm-time {quoted(text)}: minutes and seconds go up to 59 (hours to 23 "
                       f"after days); write {TIME_FORMS}")
    seconds = int(days or 0) * 86400 + sum(f * u for f, u in zip(fields, units, strict=True))
    if seconds <= 0:
        raise KdlError(f"--slurm-time {quoted(text)}: a job needs some time; write {TIME_FORMS}")
    return math.ceil(seconds / 60)


def check_available(launcher: Launcher) -> None:
    """Can this machine submit the launcher's jobs? Asked before anything is written."""
    import shutil

    try:
        import submitit  # noqa: F401
    except ImportError:
        raise KdlError(f"--launcher {launcher.name} runs points through submitit, which is not "
                       f"installed: {INSTALL}") from None
    if launcher.name == "slurm" and shutil.which("srun") is None:  # as submitit looks for Slurm
        raise KdlError("--launcher slurm: there is no `srun` on this machine's PATH, so it cannot "
                       "submit Slurm jobs. Run kdl sweep on the cluster's login node, or try the "
                       "jobs on this machine with --launcher submitit-local")


def executor(launcher: Launcher, folder: Path, name: str) -> Any:
    """submitit's executor for `launcher` (check_available said it can), its jobs' files in
    `folder`, its jobs named `name`."""
    import submitit

    if launcher.name == "slurm":
        slurm = submitit.SlurmExecutor(folder)
        slurm.update_parameters(**slurm_parameters(launcher, name))
        return slurm
    local = submitit.LocalExecutor(folder)
    local.update_parameters(timeout_min=launcher.time_min or NO_LIMIT_MIN,
                            gpus_per_node=launcher.gpus or 0, setup=list(launcher.setup))
    return local


def slurm_parameters(launcher: Launcher, name: str) -> dict[str, Any]:
    """sbatch's options, as submitit's SlurmExecutor names them. A time of None leaves --time out
    (the partition's default limit; submitit's own default is 5 minutes). Slurm does not requeue
    kdl's jobs: a search's trial run again by Slurm would start afresh in a second run folder;
    kdl's next command resubmits it to resume its run."""
    return {"job_name": name, "partition": launcher.partition, "time": launcher.time_min,
            "gpus_per_node": launcher.gpus, "cpus_per_task": launcher.cpus,
            "setup": list(launcher.setup) or None, "additional_parameters": {"no-requeue": True}}
