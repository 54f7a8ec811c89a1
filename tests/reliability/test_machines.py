"""The launcher of a run over several machines while the machines meet, before any training
process starts: what one left alone says, how it gives up, Ctrl-C meanwhile; and the errors of
several training processes, said once. (test_distributed trains over two "machines".)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

from kdl import CONFIGS, kdl
from stopping import free_port, launch, output, train_command, wait_for

from karpathy_runner import launcher

CONFIG = [str(CONFIGS / "digits_cnn.yaml"), "--set", "train.device=cpu"]


def machine(rank: int, machines: int, port: int, *more: str):
    return kdl("train", *CONFIG, "--nproc-per-node", "1", "--nnodes", machines, "--node-rank", rank,
               "--master-port", port, *more)


def left_alone(rank: int, machines: int, port: int) -> tuple[str, str]:
    """The launcher of machine `rank` of `machines`, without the others: it gives up with exit 2
    and no traceback; its first line and its last."""
    result = machine(rank, machines, port)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    return lines[0], lines[-1]


def test_a_machine_left_alone_says_what_it_waits_for_and_gives_up_in_one_paragraph(
        tmp_path, runs_dir, monkeypatch):
    """It used to wait silently, then end in a Python traceback and exit 1 (after 10 minutes,
    here 1 s); a machine other than 0 after twice the time, torch's client trying twice, each
    time with pages of C++ log. Machine 1 runs as a process of its own (torch's C++ log goes to
    its stderr), started as a script's background job is, with SIGINT ignored."""
    port, scratch = free_port(), tmp_path / "tmp"
    scratch.mkdir()
    with open(tmp_path / "machine1.log", "wb") as log:
        alone = subprocess.run(
            [sys.executable, "-c", "import sys; from karpathy_runner import launcher, cli; "
             "launcher.MEETING_TIMEOUT_S = 1; sys.argv[0] = 'kdl'; cli.main()",
             "train", *CONFIG, "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "1", "--master-port",
             str(port), "--runs-dir", str(runs_dir)], stdout=log, stderr=subprocess.STDOUT, timeout=30,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    said = (tmp_path / "machine1.log").read_text()
    assert alone.returncode == 2 and said.splitlines() == [
        f"machine 1 of 2: waiting to join machine 0 at 127.0.0.1:{port}, for up to 1 s (machine 0 shows "
        "the training)",
        f"error: machine 1 could not meet the other machines at machine 0, 127.0.0.1:{port}, within 1 s. "
        "Start the same command there with --node-rank 0 (it waits for the others), and check that "
        "--master-addr is that machine's address and --master-port a port on it that this machine can reach",
    ], said
    assert not any(scratch.iterdir())  # the launch's folder (the workers' errors, torchrun's), removed

    monkeypatch.setattr(launcher, "MEETING_TIMEOUT_S", 1)
    first, last = left_alone(0, 3, port)
    assert first == f"machine 0 of 3: waiting at port {port} for the other 2 machines to join, for up to 1 s"
    assert last.startswith(f"error: the other machines did not all join machine 0 at port {port} within "
                           "1 s (Timed out after"), last
    assert (f"with its own --node-rank (1 to 2), --master-addr the address of this machine and --master-port "
            f"{port},") in last
    assert not runs_dir.exists()


def test_a_port_in_use_or_an_address_not_found_is_one_paragraph_at_once(runs_dir, monkeypatch):
    monkeypatch.setattr(launcher, "MEETING_TIMEOUT_S", 1)  # (not waited for: refused before)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        first = machine(0, 2, port)
        assert first.exit_code == 2, first.stderr
        last = first.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: port {port} is in use on this machine"), last
        assert last.endswith("choose a free one with --master-port, the same on every machine"), last
        one = kdl("train", *CONFIG, "--nproc-per-node", "1", "--master-port", port)
        assert one.exit_code == 2 and one.stderr.strip().endswith(
            "or leave it out (on one machine torchrun finds a free one)"), one.stderr
    unknown = machine(1, 2, port, "--master-addr", "no-such-host.invalid")
    assert unknown.exit_code == 2, unknown.stderr
    assert unknown.stderr.startswith("error: --master-addr no-such-host.invalid: this machine cannot look "
                                     "that address up ("), unknown.stderr
    assert "Traceback" not in first.stderr + one.stderr + unknown.stderr and not runs_dir.exists()


def test_ctrl_c_or_sigterm_while_the_machines_meet_ends_the_launcher_at_once(tmp_path):
    """torchrun waits for the machines inside torch's TCPStore (machine 0 in its server, the
    others in its client), where Python's signal handlers wait with it: a Ctrl-C used to do
    nothing for 10 minutes, and a SIGTERM ended the launcher without a word, its temporary folder
    left behind. On a machine other than 0, torch's client logs the connect that the signal
    interrupts, with a C++ stack, as it happens: kdl's line is the last. (test_distributed stops
    two machines by Ctrl-C once they train.)"""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    waiting = {signum: launch(tmp_path / f"runs-{signum.name}", *train_command(), "--nproc-per-node", "1",
                              "--nnodes", "2", "--node-rank", "1", "--master-port", str(free_port()),
                              start_new_session=True, env={"TMPDIR": str(scratch)},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's
               for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for process in waiting.values():
            wait_for(lambda: "machine 1 of 2: waiting" in output(process), timeout=120)  # noqa: B023
        time.sleep(1)  # (torchrun's Python is done by now: the launchers wait in torch's client)
        for signum, process in waiting.items():
            os.kill(process.pid, signum)
        for signum, process in waiting.items():
            assert process.wait(timeout=10) == 128 + signum, output(process)
    finally:
        for process in waiting.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    for signum, process in waiting.items():
        where = re.search(r"waiting to join machine 0 at \S+:\d+", output(process))[0]
        how = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM,"
        assert output(process).strip().splitlines()[-1] == f"{how} {where}; no training process had started"
        assert not any((tmp_path / f"runs-{signum.name}").iterdir())
    assert not any(scratch.iterdir())  # the launches' folders, removed


def test_training_processes_that_fail_alike_say_it_once_as_the_last_line(tmp_path):
    """Each of the processes used to print the same paragraph, and torchrun's lines came after."""
    missing, scratch = tmp_path / "no such folder", tmp_path / "tmp"
    scratch.mkdir()
    failed = launch(tmp_path / "runs", str(CONFIGS / "my_images_cnn.yaml"), "--set", f"data.root={missing}",
                    "--set", "train.device=cpu", "--nproc-per-node", "2", env={"TMPDIR": str(scratch)})
    assert failed.wait(timeout=240) == 2, output(failed)
    assert not any(scratch.iterdir())  # the launch's folder (the workers' errors, torchrun's), removed
    error = f"error: image_folder: {missing} (data.root) does not exist."
    assert output(failed).count(error) == 1, output(failed)
    assert output(failed).strip().splitlines()[-1].startswith(error), output(failed)
