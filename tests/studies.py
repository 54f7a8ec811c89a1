"""A search's study as the tests read it (its Optuna trials, its trials' run folders), and
`kdl sweep` as a real process, with the hook that signals it from inside a trial."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from kdl import CONFIGS

from karpathy_runner.batch.search import Search
from karpathy_runner.batch.study import SearchSpec, open_study
from karpathy_runner.runfolder.reader import Run, iter_runs

DIGITS = CONFIGS / "digits_cnn.yaml"
HOOK = Path(__file__).parent / "sitehook"  # signals the sweep at an exact point of a trial


def study_trials(runs: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{runs / '.studies' / 'studies.db'}"
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def trial_runs(runs: Path, study: str) -> dict[int, Run]:
    found = [run for run in iter_runs(runs) if (run.meta.get("sweep") or {}).get("id") == study]
    by_trial = {run.meta["sweep"]["trial"]: run for run in found}
    assert len(by_trial) == len(found), "two run folders for one trial"
    return by_trial


def machine_search(monkeypatch, host: str, spec: SearchSpec, storage: str, study: str, runs: Path
                   ) -> Search:
    """What `kdl sweep` drives on machine `host` (KDL_HOST, left set): the study opened through a
    connection of its own, one trial at a time, its runs in `runs`."""
    monkeypatch.setenv("KDL_HOST", host)
    return Search(spec, open_study(spec, storage, study, seed=0), study, runs, 1, lambda line: None)


def hooked(**variables: str) -> dict[str, str]:
    """The environment of processes that install tests/kill_at.py's hook (KDL_TEST_SIGNAL...)."""
    return {"PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]), **variables}


def sweep_process(runs: Path, *args: str, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess:
    """`kdl sweep` as a real process, as a shell runs it (its trials are processes too), in a
    process group of its own, as a terminal's foreground job."""
    command = [sys.executable, "-m", "karpathy_runner", "sweep", str(DIGITS), *args,
               "--runs-dir", str(runs)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          start_new_session=True)
