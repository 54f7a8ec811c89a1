"""Batch work: sweep grids and tagging, parallel points, --skip-existing, --emit, TensorBoard."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kdl import CONFIGS, TINY, kdl, train_tiny
from stopping import one_thread

from karpathy_runner.batch.sweep import grid_points, parse_grid, point_sets, split_values
from karpathy_runner.errors import KdlError
from karpathy_runner.runfolder.reader import iter_runs

TINY_SETS = [item for s in TINY for item in ("--set", s)]


def test_grid_is_the_cartesian_product_with_yaml_values():
    grid = parse_grid(["optimizer.lr=0.1,1e-3", "model.channels=[8,16],[4]", "seed=0,1,2"])
    points = grid_points(grid)
    assert len(points) == 2 * 2 * 3
    assert points[0] == {"optimizer.lr": 0.1, "model.channels": [8, 16], "seed": 0}
    assert points[-1] == {"optimizer.lr": 0.001, "model.channels": [4], "seed": 2}
    assert point_sets(points[0]) == ["optimizer.lr=0.1", "model.channels=[8,16]", "seed=0"]
    assert split_values("[1,2],{a: 1, b: 2},x") == ["[1,2]", "{a: 1, b: 2}", "x"]


@pytest.mark.parametrize("bad", ["seed", "seed=", "=1,2"])
def test_malformed_grid(bad):
    with pytest.raises(KdlError):
        parse_grid([bad])


def test_bad_grid_key_runs_nothing(tmp_path):
    result = kdl("sweep", CONFIGS / "digits_cnn.yaml", "--grid", "optimizer.lrr=0.1,0.2",
                 "--runs-dir", tmp_path)
    assert result.exit_code == 2 and "Did you mean 'optimizer.lr'" in result.stderr
    assert not any(tmp_path.iterdir())


def test_sweep_runs_points_in_parallel_tags_them_and_records_failures(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the sweep shares the cores out
    # lr 1e6 makes the loss non-finite: that point fails (exit 1), the other still completes
    result = kdl("sweep", CONFIGS / "digits_cnn.yaml", "--grid", "optimizer.lr=1e6,0.001",
                 *TINY_SETS, "--set", "train.epochs=1", "--set", "optimizer.name=sgd",
                 "--jobs", "2", "--runs-dir", tmp_path)
    assert result.exit_code == 1
    sweep_id = result.last_line
    assert sweep_id.startswith("sweep-") and result.stdout.strip() == sweep_id
    events = [line for line in result.stderr.splitlines() if line.startswith("[")]
    first_end = next(i for i, line in enumerate(events) if "started" not in line)
    assert sum("started" in line for line in events[:first_end]) == 2  # both ran at once
    assert "failed" in result.stderr and "non-finite" in result.stderr
    runs = {r.meta["sweep"]["point"]["optimizer.lr"]: r for r in iter_runs(tmp_path)}
    assert {r.meta["sweep"]["id"] for r in runs.values()} == {sweep_id}
    assert (runs[1e6].status, runs[0.001].status) == ("failed", "completed")
    # two points at once on this machine's cores: torch threads of each, its share of them
    share = max(1, (os.cpu_count() or 1) // 2)
    assert [r.meta["versions"]["cpu_threads"] for r in runs.values()] == [share, share]


def test_emitted_commands_run_as_is_in_a_shell(tmp_path):
    result = kdl("sweep", CONFIGS / "digits_cnn.yaml", "--grid", "model.channels=[4],[4, 8]",
                 *TINY_SETS, "--set", "train.max_steps=2", "--emit", "--runs-dir", tmp_path)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("kdl train ") for line in lines)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # the way a user would: one command per line into xargs, two at a time
    subprocess.run(["xargs", "-d", "\n", "-P", "2", "-I", "CMD", "sh", "-c", "CMD"],
                   input="\n".join(lines),
                   text=True, check=True, env=env, capture_output=True)
    runs = list(iter_runs(tmp_path))
    assert sorted(len(r.config_dict()["model"]["channels"]) for r in runs) == [1, 2]
    assert all(r.meta["sweep"]["point"]["train.max_steps"] == 2 for r in runs)


def test_skip_existing_skips_completed_and_resumes_interrupted(tmp_path):
    args = [sys.executable, "-m", "karpathy_runner", "train", str(CONFIGS / "digits_cnn.yaml"),
            *TINY_SETS, "--set", "train.checkpoint_every_steps=1", "--set", "train.epochs=3",
            "--runs-dir", str(tmp_path), "--quiet"]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("*/checkpoints/last.pt")) and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 130
    run_id = out.strip().splitlines()[-1]

    resumed = kdl(*args[3:], "--skip-existing")
    assert resumed.exit_code == 0 and resumed.last_line == run_id
    meta = json.loads((tmp_path / run_id / "meta.json").read_text())
    assert meta["status"] == "completed" and len(meta["resumes"]) == 1

    skipped = kdl(*args[3:], "--skip-existing", "--json")
    report = json.loads(skipped.stdout)
    assert report["skipped"] and report["id"] == run_id
    assert len(list(iter_runs(tmp_path))) == 1


@pytest.mark.usefixtures("single_thread")  # the reused run, trained here, as the points are
def test_a_rerun_of_an_interrupted_sweep_compares_every_point_like_an_uninterrupted_one(tmp_path):
    """The learning-rate sweep of the README, stopped by a Ctrl-C and run again with
    --skip-existing: its table holds every point of the grid, the interrupted point resumed, the
    one the quick start had trained already reused, and says so; and its values are those of its
    points run straight through (each point is its `kdl train`: here, in this process)."""
    hook_path = os.pathsep.join([str(Path(__file__).parent.parent / "sitehook"),
                                 os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "karpathy_runner", "sweep", str(CONFIGS / "digits_cnn.yaml"),
               "--grid", "optimizer.lr=0.01,0.003,0.001", *TINY_SETS, "--set", "train.epochs=3",
               "--set", "train.deterministic=true", "--skip-existing"]

    def sweep(runs: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        # a process group of its own, as a terminal's foreground job
        return subprocess.run([*command, "--runs-dir", str(runs)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                              start_new_session=True)

    def table(runs: Path, *which: str) -> list[tuple]:  # --sweep ID, or run ids
        compared = kdl("compare", *which, "--json", "--runs-dir", runs)
        assert compared.exit_code == 0, compared.stderr
        rows = json.loads(compared.stdout)["rows"]
        return sorted((row["config"].get("optimizer.lr"), row["metrics"]["best"], row["how"])
                      for row in rows)

    def alone(runs: Path, lr: float) -> str:
        with one_thread():  # as the sweep's processes (OMP_NUM_THREADS=1): the same bits
            trained = train_tiny(runs, "--set", "train.epochs=3", "--set", "train.deterministic=true",
                                 "--set", f"optimizer.lr={lr}")
        assert trained.exit_code == 0, trained.stderr
        return trained.last_line

    straight = tmp_path / "straight"
    expected = table(straight, *(alone(straight, lr) for lr in (0.01, 0.003, 0.001)))
    runs = tmp_path / "runs"
    alone(runs, 0.001)  # the quick start
    # the first point's second epoch end sends the sweep's process group a SIGINT (a Ctrl-C)
    stopped = sweep(runs, {"PYTHONPATH": hook_path,
                           "KDL_TEST_SIGNAL": f"last.pt:2:SIGINT:parent-group:{tmp_path / 'signalled'}"})
    assert stopped.returncode == 130, stopped.stderr
    again = sweep(runs)
    assert again.returncode == 0, again.stderr
    rerun = again.stdout.split()[-1]
    assert table(runs, "--sweep", rerun) == [(lr, best, how) for (lr, best, _), how in
                                             zip(expected, ["reused", "made", "resumed"], strict=True)]
    shown = kdl("compare", "--sweep", rerun, "--runs-dir", runs)
    assert "how" in shown.stdout and "reused" in shown.stdout and "resumed" in shown.stdout
    assert kdl("runs", "--sweep", rerun, "--runs-dir", runs, "--json").stdout.count('"id"') == 3


def test_two_sweeps_of_one_grid_at_once_train_each_point_once(tmp_path):
    """Two `kdl sweep --skip-existing` of one grid, started at once over one runs folder: each
    point is trained by one of them, and the other's process for it waits, then takes the run;
    so both sweeps hold every point, made by one and reused by the other."""
    command = [sys.executable, "-m", "karpathy_runner", "sweep", str(CONFIGS / "digits_cnn.yaml"),
               "--grid", "optimizer.lr=0.01,0.003", *TINY_SETS, "--set", "train.epochs=1",
               "--jobs", "2", "--skip-existing", "--runs-dir", str(tmp_path)]
    sweeps = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    ended = [sweep.communicate(timeout=240) for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0], [err for _, err in ended]
    runs = list(iter_runs(tmp_path))
    by_point = {run.meta["sweep"]["point"]["optimizer.lr"]: run.id for run in runs}
    assert len(runs) == len(by_point) == 2  # one run per point, by the sweep that made it
    assert len({run.meta["config_hash"] for run in runs}) == 2
    taken = []
    for out, err in ended:
        compared = kdl("compare", "--sweep", out.split()[-1], "--json", "--runs-dir", tmp_path)
        rows = json.loads(compared.stdout)["rows"]
        taken += [(row["id"], row["how"]) for row in rows]
        assert sorted(row["id"] for row in rows) == sorted(by_point.values())
        assert all(run_id in err for run_id in by_point.values())  # the sweep's own table
    assert sorted(taken) == sorted((run_id, how) for run_id in by_point.values()
                                   for how in ("made", "reused"))
    assert not list((tmp_path / ".sweeps" / "claims").iterdir())  # each claim let go and removed


def test_skip_existing_waits_for_a_running_run_of_its_config_and_takes_it(tmp_path):
    """`kdl train --skip-existing` while a run of the same config trains (here stopped, so it
    stays running however fast the machine): it waits for that run to end and reports it as its
    own, completed, rather than train a second."""
    args = [sys.executable, "-m", "karpathy_runner", "train", str(CONFIGS / "digits_cnn.yaml"),
            *TINY_SETS, "--set", "train.epochs=1", "--runs-dir", str(tmp_path), "--quiet"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(run.status == "running" for run in iter_runs(tmp_path)):
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    try:
        (run,) = iter_runs(tmp_path)
        assert run.status == "running"
        second = subprocess.Popen([*args, "--skip-existing", "--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert select.select([second.stderr], [], [], 60)[0], "no word of a wait"
        said = second.stderr.readline()
        assert f"run {run.id} of this config is in use by another kdl process (pid {first.pid})" in said
        time.sleep(0.5)
        assert second.poll() is None  # still waiting
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and first.wait(timeout=120) == 0, err
    report = json.loads(out)
    assert (report["id"], report["status"], report["skipped"]) == (run.id, "completed", True)
    assert [r.id for r in iter_runs(tmp_path)] == [run.id]


def test_tensorboard_event_files_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train_tiny(tmp_path)
    events = EventAccumulator(str(tmp_path / result.last_line / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss", "val/accuracy", "train_epoch/loss"} <= set(tags["scalars"])
    assert "train/examples" in tags["images"]
    (config,) = events.Tensors("config/text_summary")  # the resolved config, as text
    assert "channels: [8, 16]" in config.tensor_proto.string_val[0].decode()
    metrics = [json.loads(line) for line in (tmp_path / result.last_line / "metrics.jsonl").open()]
    val = [r for r in metrics if r["split"] == "val"]
    assert [e.step for e in events.Scalars("val/loss")] == [r["step"] for r in val] == [21, 42]
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([r["loss"] for r in val])
    # the HParams tab: the config by dotted name, and the metrics it compares runs by
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["optimizer.lr"].number_value == pytest.approx(0.015)
    assert values["model.name"].string_value == "cnn"
    assert values["model.channels"].string_value == "[8, 16]"
    assert values["train.epochs"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"])
    declared = {info.name.tag for info in experiment.experiment.metric_infos}
    assert {"val/loss", "val/accuracy", "train_epoch/loss", "train_epoch/accuracy"} == declared
    assert declared <= set(tags["scalars"])  # each has the values TensorBoard will show


def test_shell_completion_completes_commands_and_options():
    def complete(words: str, cword: int) -> str:
        env = {**os.environ, "_KDL_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(cword)}
        return subprocess.run([str(Path(sys.executable).parent / "kdl")], env=env,
                              capture_output=True, text=True, check=True).stdout.split()

    assert complete("kdl sw", 1) == ["sweep"]
    assert complete("kdl train --skip", 2) == ["--skip-existing"]
