"""A study shared between machines through a real PostgreSQL server (tests/postgres.py): two
`kdl sweep` processes with different KDL_HOST stand for two machines sharing the study and a
runs folder. They share the trials, none twice; each resumes only its own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from kdl import TINY, kdl
from postgres import Server, free_port, postgres_server
from stopping import sets, wait_for
from studies import DIGITS, hooked, machine_search, trial_runs

from karpathy_runner.batch import study
from karpathy_runner.batch.space import parse_space
from karpathy_runner.batch.study import SearchSpec, open_study
from karpathy_runner.errors import KdlError
from karpathy_runner.runfolder.reader import Run

# four points, one trial process at a time on each machine
GRID = ["--search", "grid", "--space", "seed=int(0,3)", "--jobs", "1", *sets(TINY)]
STUDY = "shared"


@pytest.fixture(scope="module")
def server() -> Server:
    with postgres_server() as running:
        yield running


def machine(host: str, runs: Path, storage: str, **hook: str) -> subprocess.Popen:
    """`kdl sweep` on machine `host`: a process of its own, as a shell on that machine runs it."""
    command = [sys.executable, "-m", "karpathy_runner", "sweep", str(DIGITS), *GRID,
               "--storage", storage, "--study", STUDY, "--runs-dir", str(runs)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "KDL_HOST": host, **hook},
                            start_new_session=True)


def ended(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def test_two_machines_share_a_study_and_each_resumes_only_its_own_trials(tmp_path, server):
    runs, storage = tmp_path / "runs", server.createdb("two_machines")
    # both start at once on a new database; each goes down (the sweep and its trial, SIGKILL)
    # in its first trial, before the meta.json that records the trial's first epoch
    down = {host: hooked(KDL_TEST_SIGNAL="meta.json:2:SIGKILL:parent-and-self",
                         KDL_TEST_SIGNAL_PROCESS=f"1:{tmp_path / host}") for host in "ab"}
    first = {host: machine(host, runs, storage, **down[host]) for host in "ab"}
    for host, process in first.items():
        code, stderr = ended(process)
        assert code == -9, (host, stderr)

    study = optuna.load_study(study_name=STUDY, storage=storage)
    left = {t.user_attrs["host"]: t for t in study.get_trials() if t.state.name == "RUNNING"}
    assert sorted(left) == ["a", "b"]  # one trial each, stopped mid-way; two points still queued
    assert [t.state.name for t in study.get_trials()].count("WAITING") == 2
    b_run = trial_runs(runs, STUDY)[left["b"].number]
    b_meta = (b_run.path / "meta.json").read_bytes()

    # machine a again: it resumes its trial, not b's (b may still be training it), and takes
    # the two points left
    code, stderr = ended(machine("a", runs, storage))
    assert code == 0, stderr
    assert f"resuming 1 unfinished trial(s): {left['a'].number}\n" in stderr
    assert ("1 unfinished trial(s) of another machine (b; this is a) left to it: its command resumes "
            "them. If that machine is gone and its trials' runs are in this runs folder, run this "
            "command with KDL_HOST=b\n") in stderr
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states.pop(left["b"].number) == "RUNNING"
    assert set(states.values()) == {"COMPLETE"} and len(states) == 3
    assert (b_run.path / "meta.json").read_bytes() == b_meta  # b's run untouched

    code, stderr = ended(machine("b", runs, storage))
    assert code == 0, stderr
    assert f"resuming 1 unfinished trial(s): {left['b'].number}\n" in stderr

    # the study: four trials, the grid's points each once, each trial one run of its machine
    trials = study.get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(4)]
    assert sorted(t.params["seed"] for t in trials) == [0, 1, 2, 3]
    done = trial_runs(runs, STUDY)  # (one run folder per trial, or it fails)
    assert sorted(done) == [0, 1, 2, 3]
    for trial in trials:
        meta = Run(done[trial.number].path).meta
        assert meta["host"] == trial.user_attrs["host"]
        assert meta["sweep"]["point"] == {"seed": trial.params["seed"]}
        assert meta["status"] == "completed" and trial.value == meta["best"]["value"]
        resumed = trial.number in (left["a"].number, left["b"].number)
        assert len(meta.get("resumes") or []) == resumed, trial.number
    assert sorted(t.user_attrs["host"] for t in trials) == ["a", "a", "a", "b"]


def test_commands_opening_a_new_study_at_once_make_it_once(server, monkeypatch):
    """Four machines' commands open one new study on a new database at the same moment: the
    database lets one make its tables and the study; it queues the grid's points (slowly, here)
    while the others wait for it, and the points are queued once."""
    storage = server.createdb("at_once")
    enqueue, queued_by = optuna.Study.enqueue_trial, []

    def slowly(*args: object, **kwargs: object) -> None:
        queued_by.append(threading.current_thread().name)
        time.sleep(0.3)
        enqueue(*args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", slowly)
    spec = SearchSpec(DIGITS, [], parse_space(["seed=int(0,3)"]), "grid", 4, "val.loss", "minimize",
                      "hash", "digits")
    start, opened, failed = threading.Barrier(4), [], []

    def open_it() -> None:
        start.wait()
        try:
            opened.append(open_study(spec, storage, STUDY, seed=0))
        except Exception as exc:
            failed.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed and len(opened) == 4
    assert len(queued_by) == 4 and len(set(queued_by)) == 1
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["WAITING"] * 4


def test_the_last_grid_point_goes_to_one_machine(tmp_path, server, monkeypatch):
    """Machine b sees a point queued, and machine a takes it before b asks: b's trial gets no
    values and runs nothing, so no point runs twice."""
    storage = server.createdb("last_point")
    spec = SearchSpec(DIGITS, [], parse_space(["seed=int(0,1)"]), "grid", 2, "val.loss", "minimize",
                      "hash", "digits")
    a, b = (machine_search(monkeypatch, host, spec, storage, STUDY, tmp_path) for host in "ab")
    assert a.ask().params == {"seed": 0}
    real_ask = b.study.ask

    def ask_after_a() -> optuna.trial.Trial:
        a.ask()
        return real_ask()

    monkeypatch.setattr(b.study, "ask", ask_after_a)
    assert b.ask() is None
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert [(t.params, t.user_attrs["host"]) for t in trials if t.params] == [
        ({"seed": 0}, "a"), ({"seed": 1}, "a")]
    assert [t.state.name for t in trials if not t.params] == ["FAIL"]


@pytest.mark.parametrize("where", ["a closed port", "a wrong password"])
def test_a_storage_that_refuses_the_connection_is_named_without_its_password(
        tmp_path, server, where):
    port = free_port() if where == "a closed port" else server.port
    url = Server(port, {}).url("postgres", "wrong-pass")
    result = kdl("sweep", DIGITS, *GRID, "--storage", url, "--runs-dir", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())
    assert f"study storage 'postgresql://kdl:***@127.0.0.1:{port}/postgres'" in said
    assert "cannot connect" in said and "user, password and database" in said
    assert {"a closed port": "Connection refused",
            "a wrong password": "password authentication failed"}[where] in said
    assert "wrong-pass" not in result.stderr


def test_a_halving_study_with_another_machines_trials_is_refused(tmp_path, server, monkeypatch):
    """Its rungs are decided from every trial's value: one machine drives it."""
    storage = server.createdb("halving")
    spec = SearchSpec(DIGITS, [], parse_space(["seed=int(0,3)"]), "random", 4, "val.loss",
                      "minimize", "hash", "digits", halving=2, min_epochs=1, epochs=2)
    machine_search(monkeypatch, "b", spec, storage, STUDY, tmp_path).ask()
    search = machine_search(monkeypatch, "a", spec, storage, STUDY, tmp_path)
    with pytest.raises(KdlError) as refused:
        search.halve()
    said = str(refused.value)
    assert f"study {STUDY} has trials of another machine (b; this is a)" in said
    assert "one machine drives a halving study" in said and "KDL_HOST=b" in said
    assert len(search.study.get_trials()) == 1  # nothing asked, nothing run


def test_a_server_that_takes_the_connection_and_never_answers_is_given_up_in_seconds(tmp_path, monkeypatch):
    """A host that accepts the connection but says nothing (a hung server, a proxy with nothing
    behind it) would keep libpq waiting as long as the system lets it: kdl gives up after
    CONNECT_TIMEOUT_S (10 s; here libpq's least, 2 s) with the usual paragraph."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[test]'")
    monkeypatch.setattr(study, "CONNECT_TIMEOUT_S", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the connections; nobody reads or answers
        url = Server(silent.getsockname()[1], {}).url("postgres")
        # without a timeout the command would wait for good: closing the socket resets its connection
        hung = threading.Timer(20, silent.close)
        hung.start()
        started = time.monotonic()
        command = kdl("sweep", DIGITS, *GRID, "--storage", url, "--runs-dir", tmp_path)
        waited = time.monotonic() - started
        hung.cancel()
    assert command.exit_code == 2, command.stderr
    said = " ".join(command.stderr.split())
    assert "cannot connect" in said and "timeout expired" in said, said
    assert 2 <= waited < 20, waited


def test_a_url_that_sets_its_own_connect_timeout_keeps_it():
    """kdl's connect timeout is a default: a postgresql:// URL with its own connect_timeout goes
    to Optuna as it is (nothing connects yet), as does another database's URL. (One without it
    gets kdl's: the test of a server that never answers.)"""
    own = "postgresql://kdl@db.invalid/studies?connect_timeout=3"
    assert study._storage(own) == own
    assert study._storage("sqlite:///studies.db") == "sqlite:///studies.db"


def test_a_database_lost_during_a_search_is_one_paragraph_and_the_same_command_resumes(tmp_path):
    """The server goes down while the first trial trains: the search ends with exit 1 and one
    paragraph, no traceback; the trial's process finishes its run. The server back, the same
    command takes that run for the trial, trains the other, and the study ends with both."""
    with postgres_server() as own:
        storage = own.createdb("lost")
        runs = tmp_path / "runs"
        two = ["--search", "grid", "--space", "seed=int(0,1)", "--jobs", "1", *sets(TINY)]
        command = [sys.executable, "-m", "karpathy_runner", "sweep", str(DIGITS), *two,
                   "--storage", storage, "--study", "lost", "--runs-dir", str(runs)]
        lingering = hooked(KDL_TEST_SIGNAL="last.pt:1:SIGCONT:self", KDL_TEST_SIGNAL_LINGER="4")
        search = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **lingering},
                                  start_new_session=True)
        try:
            wait_for(lambda: list(runs.glob("2*/checkpoints/last.pt")) or search.poll() is not None,
                     timeout=120)
            own.stop()
            code, stderr = ended(search)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(search.pid, signal.SIGKILL)
        said = " ".join(stderr.split())
        assert code == 1 and "Traceback" not in stderr, stderr
        assert ("study storage 'postgresql://kdl:***@127.0.0.1:" in said
                and "the database stopped answering during the search" in said
                and "run the same command: it resumes the unfinished trials" in said), said
        [first] = (Run(path) for path in runs.glob("2*"))
        wait_for(lambda: Run(first.path).status == "completed", timeout=60)

        own.start()
        again = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert again.returncode == 0, again.stderr
        trials = optuna.load_study(study_name="lost", storage=storage).get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
        runs_now = [Run(path) for path in sorted(runs.glob("2*"))]
        assert len(runs_now) == 2 and first.id in [r.id for r in runs_now]
        assert "resumes" not in Run(first.path).meta  # taken as its process finished it
