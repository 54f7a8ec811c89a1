"""`kdl sweep --launcher`: points and trials as submitit jobs. Jobs run through submitit's
LocalExecutor (`--launcher submitit-local`: real processes, real pickled jobs and job folders);
Slurm's own path up to sbatch, with a fake sbatch on PATH; and the launcher's options refused
before anything is written."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kdl import TINY, kdl
from stopping import RANDOM, assert_same_training, sets, wait_for
from studies import DIGITS, HOOK, study_trials, trial_runs

from karpathy_runner.runfolder import layout, sweeps
from karpathy_runner.runfolder.locks import RunLock
from karpathy_runner.runfolder.reader import Run, iter_runs

SHORT = [*RANDOM, "train.max_steps=12"]  # checkpoints at steps 4, 8 and 12
TWO_EPOCHS = [*TINY, "data.batch_size=256"]  # 6 steps an epoch
JOBS = ["--launcher", "submitit-local"]


@pytest.fixture(autouse=True)
def one_thread_jobs(monkeypatch):
    """Jobs train with one thread each (a job's environment is the command's): two at once on
    a small machine, and runs compared bit for bit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def status(runs: Path, *args: str) -> list[dict]:
    shown = kdl("sweep", DIGITS, *args, "--status", "--json", "--runs-dir", runs)
    assert shown.exit_code == 0, shown.stderr
    return json.loads(shown.stdout)["jobs"]


def test_grid_points_run_as_jobs_and_a_rerun_resumes_the_killed_one(tmp_path, monkeypatch):
    """Two points, two jobs, two run folders as the local pool makes them; the points differ in
    name only, so they train alike. The first `kdl train` to start is killed at its second
    checkpoint: --status tells it, and the same command run again submits that point alone,
    whose job resumes its run to the very end its twin reached. Run once more, it submits
    nothing."""
    runs = tmp_path / "runs"
    grid = ["--grid", "name=first,second", *sets(SHORT), *JOBS]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KDL_TEST_SIGNAL", "last.pt:2:SIGKILL:self")
    monkeypatch.setenv("KDL_TEST_SIGNAL_PROCESS", f"1:{tmp_path / 'started'}")
    first = kdl("sweep", DIGITS, *grid, "--runs-dir", runs)
    assert first.exit_code == 1, first.stderr
    sweep_id = first.last_line
    assert first.stderr.count("submitted job") == 2
    rows = {row["point"]["name"]: row for row in status(runs, *grid)}
    [killed] = [name for name, row in rows.items() if row["state"] == "FAILED"]
    [twin] = [name for name, row in rows.items() if row["state"] == "COMPLETED"]
    assert (rows[killed]["status"], rows[twin]["status"]) == ("crashed", "completed")

    monkeypatch.delenv("KDL_TEST_SIGNAL")
    again = kdl("sweep", DIGITS, *grid, "--runs-dir", runs)
    assert again.exit_code == 0, again.stderr
    assert again.last_line == sweep_id and again.stderr.count("submitted job") == 1
    assert [row["state"] for row in status(runs, *grid)] == ["COMPLETED", "COMPLETED"]
    assert "submitted" not in kdl("sweep", DIGITS, *grid, "--runs-dir", runs).stderr

    made = {run.meta["sweep"]["point"]["name"]: run for run in iter_runs(runs)}
    assert len(made) == 2 and all(run.meta["sweep"]["id"] == sweep_id for run in made.values())
    resumed = made[killed]
    assert resumed.id == rows[killed]["run"] and len(resumed.meta["resumes"]) == 1
    assert resumed.meta["command"][:3] == ["kdl", "train", str(DIGITS)]  # the local pool's command
    assert sorted(p.name for p in resumed.path.iterdir()) == sorted(p.name for p in made[twin].path.iterdir())
    assert_same_training(resumed.path, made[twin].path)


def _training(runs: Path) -> bool:
    """Does a `kdl train --skip-existing` of this runs folder run (a job's child)?"""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--skip-existing" in words and str(runs).encode() in words:
            return True
    return False


def test_a_job_killed_without_warning_on_one_node_is_resumed_by_its_resubmission_on_another(
        tmp_path, monkeypatch):
    """A point's job dies at once on node a (SIGKILL: out of memory, a node lost): its run reads
    running there still. The rerun on node b (KDL_HOST) resubmits it. Node b cannot look node
    a's pid up; the run's heartbeat (its .lock's time) says the process lives, so the job waits
    for it, neither training the run twice nor counting the point done. Once the heartbeat is
    silent past its limit (aged here, not waited for) the run reads crashed, and the job resumes
    it to the end."""
    runs = tmp_path / "runs"
    grid = ["--grid", "name=only", *sets(SHORT), *JOBS]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KDL_TEST_SIGNAL", "last.pt:2:SIGKILL:self")
    monkeypatch.setenv("KDL_HOST", "node-a")
    assert kdl("sweep", DIGITS, *grid, "--runs-dir", runs).exit_code == 1
    [run] = iter_runs(runs)
    # on node a its pid tells: crashed
    assert (run.meta["status"], run.status, run.meta["host"]) == ("running", "crashed", "node-a")

    monkeypatch.delenv("KDL_TEST_SIGNAL")
    monkeypatch.setenv("KDL_HOST", "node-b")
    assert Run(run.path).status == "running"  # as node b sees it: node a's process may live
    # a temp file of node a's writer: a job that took the run's lock would clear it
    (run.path / ".meta.json.1.tmp").write_text("{}")
    waited, stop = threading.Event(), threading.Event()

    def silence_the_heartbeat_once_the_job_waits() -> None:
        since, deadline = None, time.monotonic() + 90  # (the job waits forever without it)
        while not stop.is_set() and time.monotonic() < deadline:
            if _training(runs) and json.loads((run.path / "meta.json").read_text())["host"] == "node-a":
                since = since or time.monotonic()
                if time.monotonic() - since > 3:  # alive 3 s without taking the run: waiting,
                    if (run.path / ".meta.json.1.tmp").exists():  # its lock left alone
                        waited.set()
                    break
            else:
                since = None
            time.sleep(0.1)
        old = time.time() - layout.STALE_BEATS * layout.HEARTBEAT_S - 1
        os.utime(run.path / ".lock", (old, old))

    watcher = threading.Thread(target=silence_the_heartbeat_once_the_job_waits)
    watcher.start()
    try:
        again = kdl("sweep", DIGITS, *grid, "--runs-dir", runs)
    finally:
        stop.set()
        watcher.join()
    assert again.exit_code == 0, again.stderr
    assert waited.is_set(), "the resubmitted job did not wait, lock untouched, for the run that beats"
    logs = "".join(p.read_text() for p in runs.glob(".sweeps/*/jobs/*_log.err"))
    assert f"run {run.id} of this config is training (pid {run.meta['pid']} on node-a): waiting" in logs
    [resumed] = iter_runs(runs)
    assert (resumed.status, resumed.meta["host"], resumed.meta["step"]) == ("completed", "node-b", 12)
    assert [r["step"] for r in resumed.meta["resumes"]] == [4]  # (killed writing the second)
    [row] = status(runs, *grid)
    assert (row["state"], row["status"]) == ("COMPLETED", "completed")


def test_a_rerun_waits_for_the_trial_job_an_earlier_command_left_running(tmp_path, monkeypatch):
    """The command killed while its trial's job trains (as a login session lost): the job goes
    on, and the same command run again waits for it rather than submit the trial again."""
    runs = tmp_path / "runs"
    search = ["--space", "seed=int(0,9)", "--trials", "1", *sets(SHORT), *JOBS]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KDL_TEST_SIGNAL", "last.pt:1:SIGCONT:self")  # a harmless signal, then
    monkeypatch.setenv("KDL_TEST_SIGNAL_LINGER", "3")  # the run waits: its job outlives the command
    command = subprocess.Popen([sys.executable, "-m", "karpathy_runner", "sweep", str(DIGITS), *search,
                                "--runs-dir", str(runs)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: list(runs.glob("2*/meta.json")))
    command.kill()
    command.wait()
    monkeypatch.delenv("KDL_TEST_SIGNAL")
    again = kdl("sweep", DIGITS, *search, "--runs-dir", runs)
    assert again.exit_code == 0, again.stderr
    assert "(RUNNING), submitted before" in again.stderr and "submitted job" not in again.stderr
    assert [t.state.name for t in study_trials(runs, again.last_line)] == ["COMPLETE"]
    [run] = iter_runs(runs)
    assert run.status == "completed" and "resumes" not in run.meta
    [row] = status(runs, *search)
    assert (row["state"], row["run"]) == ("COMPLETED", run.id)


def test_one_command_drives_a_sweep_at_a_time(tmp_path):
    """A second command of a sweep whose jobs one drives is refused, naming the first."""
    grid = ["--grid", "seed=0", *JOBS]
    shown = kdl("sweep", DIGITS, *grid, "--status", "--json", "--runs-dir", tmp_path)
    sweep_id = json.loads(shown.stdout)["sweep"]
    with RunLock(sweeps.sweep_folder(tmp_path, sweep_id), what=f"sweep {sweep_id}").acquire():
        result = kdl("sweep", DIGITS, *grid, "--runs-dir", tmp_path)
    assert result.exit_code == 2
    assert f"sweep {sweep_id} is in use by another kdl process (pid {os.getpid()})" in result.stderr
    assert not list(tmp_path.glob("2*")) and not (tmp_path / ".sweeps" / sweep_id / "jobs.jsonl").exists()


def test_a_trial_warned_of_its_time_limit_stops_with_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    """A search's trial is a job too. Slurm's warning before the time limit (SIGUSR2, which
    submitit asks for, to each process of the job) stops its `kdl train` with a checkpoint: the
    trial waits, RUNNING, and the same command run again resumes its run in a new job."""
    runs = tmp_path / "runs"
    search = ["--space", "seed=int(0,9)", "--trials", "1", *sets(SHORT), *JOBS]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KDL_TEST_SIGNAL", "last.pt:1:SIGUSR2:parent-and-self")
    monkeypatch.setenv("KDL_TEST_SIGNAL_LINGER", "1")  # (the job passes it on within 0.2 s)
    warned = kdl("sweep", DIGITS, *search, "--runs-dir", runs)
    assert warned.exit_code == 1, warned.stderr
    study = warned.last_line
    [run] = trial_runs(runs, study).values()
    assert run.status == "interrupted" and run.meta["step"] < 12
    assert [t.state.name for t in study_trials(runs, study)] == ["RUNNING"]
    [row] = status(runs, *search)
    assert (row["trial"], row["state"], row["run"], row["status"]) == (0, "FAILED", run.id, "interrupted")
    assert row["point"] == {"seed": run.meta["sweep"]["point"]["seed"]}

    monkeypatch.delenv("KDL_TEST_SIGNAL")
    again = kdl("sweep", DIGITS, *search, "--runs-dir", runs)
    assert again.exit_code == 0, again.stderr
    assert again.stderr.count("submitted job") == 1
    assert [t.state.name for t in study_trials(runs, study)] == ["COMPLETE"]
    [resumed] = trial_runs(runs, study).values()
    assert (resumed.id, resumed.status, len(resumed.meta["resumes"])) == (run.id, "completed", 1)
    assert [row["state"] for row in status(runs, *search)] == ["COMPLETED"]


def test_halving_trials_pause_and_resume_as_jobs(tmp_path):
    """Successive halving with jobs: both trials train the first rung (epoch 1) in jobs that
    pause them, and the better one resumes to the end in a third job."""
    runs = tmp_path / "runs"
    result = kdl("sweep", DIGITS, "--search", "grid", "--space", "seed=choice(0,1)",
                 "--halving", "2", "--jobs", "2", *sets(TWO_EPOCHS), *JOBS, "--runs-dir", runs)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("submitted job") == 3
    states = sorted(t.state.name for t in study_trials(runs, result.last_line))
    assert states == ["COMPLETE", "PRUNED"]
    assert sorted(run.status for run in trial_runs(runs, result.last_line).values()) == [
        "completed", "pruned"]


FAKE_SLURM = {  # what submitit calls: sbatch to submit, sacct for states, srun must be on PATH
    "sbatch": 'echo "$@" > "$(dirname "$0")/sbatch.args"\necho "Submitted batch job 4242"',
    "sacct": "printf 'JobID|State|NodeList\\n4242|CANCELLED by 0|\\n'",
    "srun": "exit 0",
}


def test_slurm_jobs_are_submitted_with_the_options_given(tmp_path, monkeypatch):
    """Through submitit's SlurmExecutor to a fake sbatch: the sbatch script submitit writes asks
    for the partition, GPUs, time, cores and setup line given; the job (cancelled, says the
    fake sacct) is reported as such, by the sweep and by --status."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    runs = tmp_path / "runs"
    grid = ["--grid", "seed=0", *sets(SHORT), "--launcher", "slurm", "--slurm-partition", "gpu",
            "--slurm-gpus", "2", "--slurm-time", "1:30:00", "--slurm-cpus", "8",
            "--slurm-setup", "module load cuda"]
    result = kdl("sweep", DIGITS, *grid, "--runs-dir", runs)
    assert result.exit_code == 1, result.stderr
    assert "submitted job 4242" in result.stderr and "ended CANCELLED before kdl train did" in result.stderr
    path = runs / ".sweeps" / result.last_line / "jobs" / "4242_submission.sh"
    script = path.read_text()
    lines = script.splitlines()
    for line in ["#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --no-requeue", "module load cuda"]:
        assert line in lines, script
    assert lines.index("module load cuda") < next(i for i, s in enumerate(lines) if s.startswith("srun"))
    [submitted] = (bin_folder / "sbatch.args").read_text().split()  # submitit's link to the script
    assert Path(submitted).resolve() == path.resolve()
    with (path.parent / "4242_submitted.pkl").open("rb") as file:  # what the job runs
        job = pickle.load(file).function
    assert job.argv[-2:] == ["--nproc-per-node", "2"]  # the point over both GPUs of its job
    [row] = status(runs, *grid)
    assert (row["job"], row["state"], row["run"]) == ("4242", "CANCELLED", None)


def test_a_job_of_two_gpus_trains_its_point_in_two_processes(tmp_path):
    """--slurm-gpus 2: a job trains its point over both GPUs, one process each (torchrun,
    DistributedDataParallel), into one run folder of the sweep. Here a submitit-local job on the
    CPU, where the two processes are gloo's."""
    runs = tmp_path / "runs"
    grid = ["--grid", "seed=0", *sets(SHORT), *JOBS, "--slurm-gpus", "2"]
    result = kdl("sweep", DIGITS, *grid, "--runs-dir", runs)
    assert result.exit_code == 0, result.stderr
    [run] = iter_runs(runs)
    assert (run.meta["status"], run.meta["processes"], run.meta["sweep"]["id"]) == (
        "completed", 2, result.last_line)
    [row] = status(runs, *grid)
    assert (row["state"], row["run"]) == ("COMPLETED", run.id)


@pytest.mark.parametrize("args, says", [
    (["--launcher", "pbs"], "--launcher 'pbs' is not a launcher; use one of local, slurm, submitit-local"),
    (["--slurm-time", "10"], "--slurm-time is an option of --launcher slurm"),
    (["--launcher", "submitit-local", "--slurm-partition", "gpu"], "submitit-local takes --slurm-gpus"),
    (["--launcher", "slurm", "--slurm-time", "1:2:3:4"], "--slurm-time '1:2:3:4' is not a time limit"),
    (["--launcher", "slurm", "--slurm-time", "1:75:00"], "minutes and seconds go up to 59"),
    (["--launcher", "slurm", "--slurm-time", "0"], "--slurm-time '0': a job needs some time"),
    (["--launcher", "slurm", "--slurm-gpus", "-1"], "Invalid value for '--slurm-gpus'"),
    (["--launcher", "slurm", "--slurm-cpus", "0"], "Invalid value for '--slurm-cpus'"),
    (["--launcher", "slurm", "--slurm-partition", "a b"], "--slurm-partition 'a b' is not a partition"),
    (["--launcher", "slurm", "--slurm-setup", " "], "give one shell line per --slurm-setup"),
    (["--launcher", "slurm", "--emit"], "so it takes no --launcher"),
    (["--launcher", "slurm"], "there is no `srun` on this machine's PATH"),
])
def test_launcher_options_are_checked_before_anything_is_written(tmp_path, monkeypatch, args, says):
    monkeypatch.setenv("PATH", str(Path(os.__file__).parent))  # a PATH without srun
    result = kdl("sweep", DIGITS, "--grid", "seed=0,1", *args, "--runs-dir", tmp_path)
    assert result.exit_code == 2, result.stderr
    assert says in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_status_of_a_grid_never_submitted_lists_its_points(tmp_path):
    rows = status(tmp_path, "--grid", "seed=0,1")
    assert [(row["point"], row["state"], row["job"]) for row in rows] == [
        ({"seed": 0}, "not submitted", None), ({"seed": 1}, "not submitted", None)]
    assert not any(tmp_path.iterdir())

