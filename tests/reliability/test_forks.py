"""The local pool's fork server (karpathy_runner/batch/forks.py): a point forked from it is a
`kdl train` process as a fresh one is; a server gone leaves the sweep to fresh processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from kdl import CONFIGS, TINY
from stopping import only_run, read_json, wait_for

from karpathy_runner.batch import forks
from karpathy_runner.batch.sweep import Point, Processes, Sweep
from karpathy_runner.runfolder.layout import process_running

pytestmark = pytest.mark.skipif(not forks.available(), reason="points are forked on Linux only")


def argv(runs: Path, *sets: str) -> list[str]:
    return ["train", str(CONFIGS / "digits_cnn.yaml"),
            *[item for s in [*TINY, *sets] for item in ("--set", s)], "--runs-dir", str(runs), "--quiet"]


# in the server, a weakref.finalize of each point, on an object that outlives its command: it is
# called at the point's exit by the exit handler of weakref, which the server's imports registered
FINALIZED = """
import os, sys, weakref
if sys.orig_argv[1:3] == ["-m", "karpathy_runner.forkserver"]:
    server, HELD = os.getpid(), type("Held", (), {})()
    def in_point():
        if os.getppid() == server:
            weakref.finalize(HELD, lambda: open(os.environ["KDL_TEST_MARK"], "w").close())
    os.register_at_fork(after_in_child=in_point)
"""


def test_a_forked_point_is_a_kdl_train_process_of_its_own_and_the_server_ends_with_the_sweep(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FINALIZED)
    mark = tmp_path / "finalized"
    server = forks.Forks({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "site"),
                          "KDL_TEST_MARK": str(mark)})
    try:
        assert server.serving
        # torch imported, and no thread but the main one: a fork has only the thread that forked
        # (with OMP_NUM_THREADS=1 numpy's OpenBLAS starts none either)
        assert os.listdir(f"/proc/{server.server.pid}/task") == [str(server.server.pid)]
        runs = tmp_path / "runs"
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            streamed = argv(runs, "train.epochs=500", "data.placement=stream", "data.num_workers=2")
            point = server.start(streamed, [out.fileno(), err.fileno()])
            wait_for(lambda: runs.exists() and any(runs.glob("*/metrics.jsonl")))
            assert os.getsid(point.pid) == point.pid  # a session of its own: a Ctrl-C is the sweep's
            assert os.readlink(f"/proc/{point.pid}/fd/0") == os.devnull
            children = Path(f"/proc/{point.pid}/task/{point.pid}/children")
            wait_for(lambda: len(children.read_text().split()) == 2)  # its DataLoader workers
            workers = children.read_text().split()
            point.send_signal(signal.SIGINT)  # as the sweep passes on a Ctrl-C: a checkpoint, exit 130
            assert point.wait() == 130
            assert not any(process_running(int(pid)) for pid in workers)  # its DataLoader's, forked in turn
            out.seek(0)
            err.seek(0)
            run = only_run(runs)
            assert out.read().split() == [run.name]
            assert "Ctrl-C" in err.read()
        # it ended as `python -m karpathy_runner` does: after the exit handlers that the modules it
        # imported registered (here, imported by the server before the fork), kdl's last
        assert mark.is_file()
        meta = read_json(run / "meta.json")
        assert meta["status"] == "interrupted" and meta["pid"] == point.pid
        assert meta["command"][:2] == ["kdl", "train"]
        assert meta["versions"]["cpu_threads"] == 1
    finally:
        server.close()
    assert server.server.returncode == 0  # the server ended as the pool closed its end


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, "interrupted"), (signal.SIGKILL, "failed")])
def test_a_server_killed_leaves_its_point_running_and_the_next_points_start_afresh(tmp_path, stop, status):
    pool = Processes(1)
    runs = tmp_path / "runs"
    first = Point(0, {}, argv(runs, "train.epochs=500"))
    pool.start(first)
    try:
        wait_for(lambda: runs.exists() and any(runs.glob("*/metrics.jsonl")))
        os.kill(pool.forks.server.pid, signal.SIGKILL)
        pool.forks.server.wait()
        assert not pool.ended(first)  # the point goes on without its server
        pool.stop(first, stop)  # and is still the sweep's to stop
        pool.wait(first)
        pool.finish(first)
        # its end unheard (its exit code was the server's to hear): its status is its run's, as
        # its kdl train ended it (a Ctrl-C), or failed (killed: it printed no run id)
        assert not first.process.heard and first.exit_code is None and first.status == status
        if stop == signal.SIGINT:
            assert read_json(runs / first.run_id / "meta.json")["status"] == "interrupted"
        # a fresh `python -m karpathy_runner` (a mistake, answered before torch loads: quick)
        second = Point(1, {}, argv(runs, "train.epochs=0"))
        pool.start(second)
        assert isinstance(second.process, subprocess.Popen)
        pool.wait(second)
        pool.finish(second)
        assert second.status == "bad config" and "train.epochs" in second.error, second.error
    finally:
        pool.close()


def test_a_points_seconds_are_its_own_not_its_servers_start(tmp_path):
    # a point that ends at once (a mistake in its config), forked from a server that the sweep
    # starts for it: seconds of imports before it, a fraction of one for the point
    point = Point(0, {}, argv(tmp_path / "runs", "train.epochs=0"))
    began = time.time()
    assert Sweep([point], 1, False, log=lambda line: None).run() == 1
    took = time.time() - began
    assert isinstance(point.process, forks.Forked) and point.status == "bad config"
    assert point.seconds < took / 2, (point.seconds, took)


# in the server, a SIGKILL to itself in the instant of a fork: KDL_TEST_KILL=before, as it is about
# to fork (no point starts), or after_in_parent, once forked and before it can say so
KILLED_AT_FORK = """
import os, signal, sys
if sys.orig_argv[1:3] == ["-m", "karpathy_runner.forkserver"]:
    os.register_at_fork(**{os.environ["KDL_TEST_KILL"]: lambda: os.kill(os.getpid(), signal.SIGKILL)})
"""


@pytest.mark.parametrize("when", ["before", "after_in_parent"])
def test_a_server_killed_as_it_forks_a_point_leaves_that_point_started_once(tmp_path, monkeypatch, when):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILLED_AT_FORK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setenv("KDL_TEST_KILL", when)
    pool = Processes(1)
    runs = tmp_path / "runs"
    point = Point(0, {}, argv(runs))
    pool.start(point)
    try:
        pool.wait(point)
        pool.finish(point)
    finally:
        pool.close()
    assert pool.forks is None or not pool.forks.serving
    run = only_run(runs)  # one run of the point, never two
    assert read_json(run / "meta.json")["status"] == "completed"
    if when == "before":  # never forked: the pool started it afresh, and heard its end
        assert isinstance(point.process, subprocess.Popen) and point.status == "completed"
    else:  # forked: the pool knows its process, but not its exit code (the server's to hear)
        assert isinstance(point.process, forks.Forked) and point.exit_code is None
        assert point.run_id == run.name and point.status == "completed"  # as its run says


# in the server, each point as it is forked writes its pid to KDL_TEST_MARK and sends the sweep
# (the server's parent) a SIGINT, a Ctrl-C before the sweep knows the point's pid; and the point
# is slow to take its own session (a signal sent meanwhile would find SIGINT ignored, as the
# server ignores it)
INTERRUPTING = """
import os, signal, sys, time
if sys.orig_argv[1:3] == ["-m", "karpathy_runner.forkserver"]:
    server, sweep, setsid = os.getpid(), os.getppid(), os.setsid
    def in_point():
        if os.getppid() == server:
            with open(os.environ["KDL_TEST_MARK"], "w") as mark:
                mark.write(str(os.getpid()))
            os.kill(sweep, signal.SIGINT)
    os.register_at_fork(after_in_child=in_point)
    os.setsid = lambda: (time.sleep(0.5), setsid())[1]
"""


@pytest.mark.parametrize("ignored", [False, True], ids=["heard", "ignored"])
def test_a_ctrl_c_as_a_point_starts_stops_that_point_too(tmp_path, ignored):
    """And a sweep that ignores SIGINT (a script's background job) ignores that one too."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(INTERRUPTING)
    mark, runs = tmp_path / "point", tmp_path / "runs"
    command = [sys.executable, "-m", "karpathy_runner", "sweep", str(CONFIGS / "digits_cnn.yaml"),
               "--grid", "optimizer.lr=0.01", *argv(runs, *([] if ignored else ["train.epochs=500"]))[2:]]
    command.remove("--quiet")
    try:
        sweep = subprocess.run(command, capture_output=True, text=True, timeout=120, env={
            **os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "site"),
            "KDL_TEST_MARK": str(mark)},
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None)
        if ignored:  # as a shell starts a script's `kdl sweep ... &`: it and its point go on
            assert sweep.returncode == 0 and "[1/1] completed" in sweep.stderr, sweep.stderr
            return
        assert sweep.returncode == 130, sweep.stderr
        assert "[1/1] interrupted" in sweep.stderr, sweep.stderr  # the point's own exit: 130
        # the sweep passed it on and waited for it: not left training where no one sees it
        assert not process_running(int(mark.read_text()))
    finally:
        if mark.is_file() and process_running(int(mark.read_text())):
            os.kill(int(mark.read_text()), signal.SIGKILL)


def test_the_server_ignores_a_ctrl_c_and_ends_when_its_sweep_is_killed(tmp_path):
    """A Ctrl-C goes to the sweep's process group; the server, in a session of its own, would
    not get it, and ignores it besides; the sweep killed, its end of the socket closes."""
    code = ("import os, sys, time; from karpathy_runner.batch import forks; "
            "f = forks.Forks(dict(os.environ)); print(f.server.pid if f.serving else 0, flush=True); "
            "time.sleep(60)")
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # numpy's BLAS thread
    sweep = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=environment)
    try:
        pid = int(sweep.stdout.readline())
        assert pid, "the server did not serve"
        assert os.getsid(pid) == pid
        os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        assert process_running(pid)
        sweep.kill()
        sweep.wait()
        wait_for(lambda: not process_running(pid), timeout=10)  # the server ended
    finally:
        sweep.kill()
