"""A process that holds DataLoader workers still exits."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kdl import CONFIGS


def test_a_process_holding_streamed_batches_at_exit_still_exits(tmp_path):
    """The workers ignore SIGTERM (a terminal's signal to the process group must not kill them
    mid-step), which multiprocessing's exit handler sends them before waiting for them: kdl
    closes every loader still held first, or the process would wait forever."""
    script = tmp_path / "holds.py"
    script.write_text(
        "from karpathy_runner.config.loading import load_config\n"
        "from karpathy_runner.data import Batches\n"
        "from karpathy_runner.build import streaming, build_experiment\n"
        f"exp = build_experiment(load_config({str(CONFIGS / 'digits_cnn.yaml')!r}, [\n"
        "    'train.device=cpu', 'data.placement=stream', 'data.num_workers=2']))\n"
        "HELD = Batches(exp.data.train, 256, seed=0, shuffle=True, **streaming(exp))\n"
        "print(sum(1 for _ in HELD.epoch(0)), flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "6", done.stderr


ENDS = """
import atexit, sys
from pathlib import Path

marks = Path(sys.argv[1])


class Torn:
    def __del__(self):  # runs only if Python tears the modules down at exit
        (marks / "torn-down").write_text("")


TORN = Torn()  # a module global: cleared in the teardown

from karpathy_runner import session
from karpathy_runner.cli import main

train = session.train


def training(*args, **kwargs):  # a handler registered during the command, as libraries do
    atexit.register(lambda: (marks / "handler-ran").write_text(""))
    return train(*args, **kwargs)


session.train = training
sys.argv = ["kdl", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("sets, code", [(["train.max_steps=2"], 0), (["train.epochs=x"], 2)],
                         ids=["a completed run", "a bad config"])
def test_kdl_ends_after_its_exit_handlers_without_tearing_down_its_modules(tmp_path, sets, code):
    """The teardown of torch's modules took most of a second after a run's last line (several
    seconds on a loaded machine): kdl exits once the command's exit handlers have run, with the
    command's exit status and all of its output."""
    script, marks = tmp_path / "ends.py", tmp_path / "marks"
    script.write_text(ENDS)
    marks.mkdir()
    command = [sys.executable, str(script), str(marks), "train", str(CONFIGS / "digits_cnn.yaml"),
               *(x for s in ["train.device=cpu", *sets] for x in ("--set", s)), "--runs-dir",
               str(tmp_path / "runs")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    if code == 0:
        run_id = done.stdout.strip()
        assert (tmp_path / "runs" / run_id / "meta.json").is_file()
        assert f"inspect:   kdl show {run_id}" in done.stderr  # the last lines, all flushed
        assert (marks / "handler-ran").is_file()
    else:
        assert done.stderr.startswith("error: config error") and "train.epochs" in done.stderr
    assert not (marks / "torn-down").exists()


@pytest.mark.parametrize("raised, code", [("ZeroDivisionError", 1), ("KeyboardInterrupt", 130)])
@pytest.mark.parametrize("where", ["in a command", "before main"])
def test_an_exception_no_command_handles_still_ends_kdl_with_a_failure(raised, code, where):
    """A bug in a command (an exception that reaches the top) prints Python's traceback and exits
    1, and a Ctrl-C outside the loop's handling 130, as without kdl's prompt exit: never 0. So
    does one raised before main() runs, once kdl's ending is registered (a sweep's fork server
    registers it before it forks a point, which a Ctrl-C can reach in that instant)."""
    script = "import karpathy_runner.cli as cli\n" + (
        f"def command():\n    raise {raised}()\ncli.app = command\ncli.main()\n" if where == "in a command"
        else f"cli.exit_last()\nraise {raised}()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert "Traceback" in done.stderr and raised in done.stderr
