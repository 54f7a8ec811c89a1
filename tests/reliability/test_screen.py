"""What a person sees on a terminal and what a script sees off it: the bar with its time left,
the summary of a finished run, and the lines that say a stop was heard and where a run stopped."""

from __future__ import annotations

import re
import signal

import stopping
from kdl import CONFIGS, TINY, kdl
from runfolders import make_run
from screen import press_ctrl_c_once, run_in_terminal

from karpathy_runner.ui.tables import short_id

CONFIG = str(CONFIGS / "digits_cnn.yaml")


def test_a_finished_run_clears_its_bar_and_says_what_next(runs_dir):
    screen = run_in_terminal(["train", CONFIG, *stopping.sets([*TINY, "train.epochs=3"])])
    assert screen.exit_code == 0, screen.raw
    run_id = screen.lines[-1]
    # the bar was drawn, with the epoch's and the whole run's time left
    assert re.search(r"epoch 1/3 .*eta.*\| run \d+% eta \d+s \|", screen.plain), screen.plain
    # and is gone: the screen ends with the epoch lines, the summary and the run id
    assert "eta" not in screen.text and "| run" not in screen.text, screen.text
    assert [line for line in screen.lines if line.startswith("epoch ")] == [
        line for line in screen.lines if re.match(r"epoch [123]/3  train\.loss", line)]
    assert re.search(r"^done in \d+s: 3 epochs, \d+ steps; best val\.loss [\d.]+ at epoch \d$",
                     screen.text, re.M), screen.text
    assert f"kdl eval {run_id} --split test" in screen.text
    assert screen.lines[-5].startswith("epoch 3/3")  # no bar left between them


def test_ctrl_c_on_a_terminal_says_it_was_heard_and_where_it_stopped(runs_dir):
    screen = run_in_terminal(
        ["train", CONFIG, *stopping.sets([*TINY, "train.epochs=40"])],
        on_output=press_ctrl_c_once(lambda raw: "epoch 2/40  train" in raw),
    )
    assert screen.exit_code == 130, screen.raw
    run_id = screen.lines[-1]
    heard = "Ctrl-C: stopping after this step with a checkpoint; Ctrl-C again to stop now"
    assert heard in screen.text, screen.text
    stopped = re.search(r"^interrupted (in epoch \d+/40 at step \d+|after epoch \d+/40 \(step \d+\)), "
                        rf"with a checkpoint; resume with `kdl train --resume {run_id}`$",
                        screen.text, re.M)
    assert stopped, screen.text
    assert screen.text.index(heard) < screen.text.index("interrupted ")
    # the resume (off a terminal) says where it starts from: where the stop said it ended
    step = int(re.search(r"step (\d+)", stopped.group(1)).group(1))
    resumed = kdl("train", "--resume", run_id, "--set", f"train.max_steps={step + 3}", "--allow-changes")
    assert resumed.exit_code == 0, resumed.stderr
    where = stopped.group(1)
    assert f"run {run_id}: resumed {where}" in resumed.stderr, resumed.stderr


def test_sigterm_off_a_terminal_prints_both_lines(tmp_path, monkeypatch):
    stopping.signal_at(monkeypatch, [5], signal.SIGTERM)
    result = kdl("train", CONFIG, *stopping.sets(TINY), "--runs-dir", tmp_path)
    assert result.exit_code == 143
    assert "SIGTERM: stopping after this step with a checkpoint" in result.stderr
    assert (f"interrupted in epoch 1/2 at step 5, with a checkpoint; resume with "
            f"`kdl train --resume {result.last_line} --runs-dir {tmp_path}`") in result.stderr
    assert "done in" not in result.stderr


def test_quiet_keeps_the_interrupt_lines_and_drops_the_summary(tmp_path, monkeypatch):
    stopping.signal_at(monkeypatch, [3])
    result = kdl("train", CONFIG, *stopping.sets(TINY), "--runs-dir", tmp_path, "--quiet")
    assert result.exit_code == 130
    assert "interrupted in epoch 1/2 at step 3" in result.stderr
    finished = kdl("train", "--resume", result.last_line, "--runs-dir", tmp_path, "--quiet")
    assert finished.exit_code == 0 and finished.stderr == ""


def test_compare_fits_80_columns_and_keeps_names_and_suffixes(runs_dir):
    folders = [make_run(runs_dir, [0.5, 0.3 + i / 10], config={"optimizer.lr": lr, "model.dropout": d})
               for i, (lr, d) in enumerate([(0.001, 0.1), (0.01, 0.2), (0.1, 0.3)])]
    narrow = run_in_terminal(["compare", *(f.name for f in folders), "--runs-dir", str(runs_dir)],
                             columns=80)
    assert narrow.exit_code == 0, narrow.raw
    assert all(len(line) <= 80 for line in narrow.lines)
    assert "…" not in narrow.text
    for folder in folders:  # name and random suffix, whole
        assert short_id(folder.name) in narrow.text
    assert "optimizer." in narrow.text and "dropout" in narrow.text
    wide = run_in_terminal(["compare", *(f.name for f in folders), "--runs-dir", str(runs_dir)],
                           columns=200)
    assert all(folder.name in wide.text for folder in folders)
