"""MLflow and W&B as trackers (`train.loggers`): what their own clients read back equals the run
folder, a resume continues the same tracked run, and a tracker that is not installed is a clear
exit 2 before anything is written."""

from __future__ import annotations

import json
import shutil
import signal
import sys

import pytest
import yaml
from kdl import CONFIGS, TINY, kdl, train_tiny
from stopping import RANDOM, fork, output, signal_at, train_command
from stopping import train as train_random

from karpathy_runner.config.loading import resolve
from karpathy_runner.dotted import flatten
from karpathy_runner.tasks.classify import Classify
from karpathy_runner.trackers.base import param_text, scalars
from karpathy_runner.trackers.mlflow import MlflowTracker
from karpathy_runner.trackers.wandb import wandb_mode

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An empty MLflow SQLite store: made once, since making its tables takes seconds. (mlflow is
    imported here, not with the module: a second or two that every pytest worker would spend
    collecting, whichever tests it runs.)"""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def runs(tmp_path, empty_store, monkeypatch):
    """A runs folder with an empty copy of the store where kdl puts its default one."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    return folder


def client_for(runs):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs.resolve() / 'mlflow.db'}")


def the_run(runs):
    """The one run folder in `runs` (beside MLflow's store and artifacts)."""
    (folder,) = [p for p in runs.iterdir() if (p / "meta.json").is_file()]
    return folder


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def history_of(client, run_id, folder):
    """{metric: [(step, value), ...]} of the MLflow run, for the metrics metrics.jsonl holds."""
    keys = {key for record in records(folder) for key in scalars(record)}
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}


def expected_history(folder):
    """The same from metrics.jsonl: every metric of every record at its step, in order."""
    history: dict[str, list] = {}
    for record in records(folder):
        for key, value in scalars(record).items():
            history.setdefault(key, []).append((record["step"], value))
    return history


def mlflow_run_id(folder):
    return json.loads((folder / "meta.json").read_text())["trackers"]["mlflow"]["run_id"]


def test_mlflow_reads_back_params_metrics_status_and_artifacts(tmp_path, runs, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would put artifacts in ./mlruns
    result = train_tiny(runs, "--set", "train.loggers=[tensorboard,mlflow]", "--set", "train.epochs=1",
                        "--sweep", "s1")
    assert result.exit_code == 0, result.stderr
    folder = runs / result.last_line

    client = client_for(runs)
    run = client.get_run(mlflow_run_id(folder))
    assert run.info.status == "FINISHED"
    assert run.info.run_name == folder.name
    assert run.data.tags["kdl.run_id"] == folder.name and run.data.tags["kdl.sweep"] == "s1"
    assert client.get_experiment(run.info.experiment_id).name == "digits_cnn"
    # params: the flat config under the names --set takes, values as --set reads them back
    config = resolve(yaml.safe_load((folder / "config.yaml").read_text()))
    flat = flatten(config.to_dict())
    assert run.data.params == {key: param_text(value) for key, value in flat.items()}
    assert yaml.safe_load(run.data.params["model.channels"]) == [8, 16]
    assert run.data.params["train.loggers"] == '["tensorboard", "mlflow"]'
    # metrics: each one's history is metrics.jsonl's, step by step
    history = history_of(client, run.info.run_id, folder)
    assert history == expected_history(folder) and "val.accuracy" in history
    # artifacts beside the runs, not in the working folder
    names = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= names
    summary = json.loads(open(client.download_artifacts(run.info.run_id, "summary.json",
                                                        str(tmp_path))).read())
    assert summary == json.loads((folder / "summary.json").read_text())
    assert (runs / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    # the task's example inputs as an image at step 0
    assert any(item.path == "images" for item in client.list_artifacts(run.info.run_id))


def test_a_failed_stopped_and_resumed_run_is_one_mlflow_run_equal_to_metrics_jsonl(runs, monkeypatch):
    """Records after the last checkpoint are dropped by a resume: MLflow never got them, so after
    a crash and a stop, each resumed, its history is metrics.jsonl's, with no step twice."""
    original = Classify.train_step

    def crash_at_step_11(self, batch, step, updater):  # after the checkpoint at 8, the log at 9
        if step + 1 == 11 and not getattr(Classify, "crashed", False):
            Classify.crashed = True
            raise RuntimeError("simulated crash")
        return original(self, batch, step, updater)

    monkeypatch.setattr(Classify, "train_step", crash_at_step_11)
    monkeypatch.setattr(Classify, "crashed", False, raising=False)
    assert train_random(runs, "train.loggers=[mlflow]").exit_code == 1
    folder = the_run(runs)
    client = client_for(runs)
    run_id = mlflow_run_id(folder)
    assert client.get_run(run_id).info.status == "FAILED"
    assert any(r["step"] == 9 for r in records(folder))  # in metrics.jsonl until the resume
    assert not (folder / "tb").exists()  # TensorBoard only when train.loggers names it
    assert [m.step for m in client.get_metric_history(run_id, "train.loss")] == [3, 6]

    signal_at(monkeypatch, [30])  # the resume is stopped in epoch 2, with a checkpoint
    assert train_random(runs, resume=folder.name).exit_code == 130
    assert client.get_run(run_id).info.status == "KILLED"
    assert history_of(client, run_id, folder) == expected_history(folder)

    during = []
    stopped = Classify.train_step

    def note_status(self, batch, step, updater):  # the MLflow run while the resume trains
        during.append(client.get_run(run_id).info.status)
        return stopped(self, batch, step, updater)

    monkeypatch.setattr(Classify, "train_step", note_status)
    assert train_random(runs, resume=folder.name).exit_code == 0
    assert set(during) == {"RUNNING"}
    assert mlflow_run_id(folder) == run_id and len(client.search_runs([client.get_run(run_id)
                                                                       .info.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train.loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 42
    assert history_of(client, run_id, folder) == expected_history(folder)


def test_a_run_killed_writing_a_checkpoint_resumes_into_the_same_mlflow_run(runs):
    """SIGKILL just before the third last.pt lands (step 12): metrics.jsonl already holds steps 9
    and 12 (and 15 when training ran on while the checkpoint thread wrote: records are flushed
    at each log), which MLflow never got and the resume (from step 8) drops and trains again."""
    process = fork(runs, *train_command(*RANDOM, "train.loggers=[mlflow]"),
                   kill_at=("last.pt", 3, "SIGKILL"))
    assert process.wait(timeout=300) == -signal.SIGKILL, output(process)
    folder = the_run(runs)
    assert [r["step"] for r in records(folder) if r["split"] == "train"][:4] == [3, 6, 9, 12]
    client = client_for(runs)
    run_id = mlflow_run_id(folder)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody told MLflow
    assert [m.step for m in client.get_metric_history(run_id, "train.loss")] == [3, 6]

    assert train_random(runs, resume=folder.name).exit_code == 0
    assert mlflow_run_id(folder) == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert history_of(client, run_id, folder) == expected_history(folder)


def test_parallel_runs_share_a_new_sqlite_store(tmp_path, monkeypatch):
    """Two runs at once (as `kdl sweep --jobs 2` starts them) with no store yet: one makes its
    tables while the other waits, and both land in the one experiment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    processes = [fork(runs, *train_command(*TINY, "train.epochs=1", "train.loggers=[mlflow]"))
                 for _ in range(2)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0], [output(p) for p in processes]
    client = client_for(runs)
    (experiment,) = [e for e in client.search_experiments() if e.name == "digits_cnn"]
    finished = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in finished) == ["FINISHED", "FINISHED"]


def test_a_tracker_that_fails_is_dropped_and_a_resume_sends_what_it_missed(runs, monkeypatch):
    """MLflow failing mid-run (a server gone) warns and training goes on; resumed later, the
    same MLflow run gets the points it lacks. A config change is a tag: params cannot change."""
    original = MlflowTracker.checkpointed
    calls = []

    def fails_the_second_time(self):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("server gone")
        original(self)

    monkeypatch.setattr(MlflowTracker, "checkpointed", fails_the_second_time)
    result = train_tiny(runs, "--set", "train.loggers=[mlflow]", "--set", "train.epochs=1",
                        "--set", "train.checkpoint_every_steps=10")
    assert result.exit_code == 0, result.stderr
    assert "mlflow failed and gets no more of this run: ConnectionError: server gone" in result.stderr
    folder = runs / result.last_line
    assert "mlflow failed" in (folder / "train.log").read_text()
    client = client_for(runs)
    run_id = mlflow_run_id(folder)
    assert client.get_run(run_id).info.status == "RUNNING"  # never told the end
    assert [m.step for m in client.get_metric_history(run_id, "train.loss")] == [5, 10]

    monkeypatch.setattr(MlflowTracker, "checkpointed", original)
    result = kdl("train", "--resume", folder.name, "--set", "train.epochs=2", "--allow-changes",
                 "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert history_of(client, run_id, folder) == expected_history(folder)
    assert run.data.params["train.epochs"] == "1" and run.data.tags["kdl.changed.train.epochs"] == "2"


def test_mlflow_added_at_a_resume_gets_the_history_so_far(runs, monkeypatch):
    signal_at(monkeypatch, [10])
    assert train_random(runs).exit_code == 130
    folder = the_run(runs)
    result = kdl("train", "--resume", folder.name, "--set", "train.loggers=[tensorboard,mlflow]",
                 "--allow-changes", "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.stderr
    client = client_for(runs)
    history = history_of(client, mlflow_run_id(folder), folder)
    assert history == expected_history(folder) and history["train.loss"][0][0] == 3


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_not_installed_is_exit_2_naming_the_pip_command(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import mlflow` now fails as if absent
    runs = tmp_path / "runs"
    result = train_tiny(runs, "--set", f"train.loggers=[tensorboard,{tracker}]")
    assert result.exit_code == 2
    assert f"pip install 'karpathy-runner[{tracker}]'" in result.stderr
    assert "Traceback" not in result.stderr and not runs.exists()


def test_a_resume_asking_for_a_missing_tracker_leaves_the_run_resumable(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    signal_at(monkeypatch, [5])
    assert train_random(runs).exit_code == 130
    folder = the_run(runs)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "wandb", None)
        result = kdl("train", "--resume", folder.name, "--set", "train.loggers=[wandb]",
                     "--allow-changes", "--runs-dir", runs, "--quiet")
    assert result.exit_code == 2 and "karpathy-runner[wandb]" in result.stderr
    assert json.loads((folder / "meta.json").read_text())["status"] == "interrupted"
    assert train_random(runs, resume=folder.name).exit_code == 0


def test_an_mlflow_store_that_cannot_open_fails_the_run_with_its_reason(tmp_path):
    runs = tmp_path / "runs"
    result = train_tiny(runs, "--set", "train.loggers=[mlflow]", "--set",
                        "train.mlflow.tracking_uri=nosuchscheme://store")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "nosuchscheme://store" in result.stderr and "train.mlflow.tracking_uri" in result.stderr
    meta = json.loads((the_run(runs) / "meta.json").read_text())
    assert meta["status"] == "failed" and "nosuchscheme://store" in meta["error"]
    assert f"then continue with `kdl train --resume {meta['id']} --runs-dir {runs}`" in result.stderr


def wandb_records(path):
    """The records of an offline W&B run's .wandb file (what `wandb sync` uploads): a LevelDB
    log (32 KiB blocks, 7-byte chunk headers) of protobuf Records, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, parts = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        parts += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(parts)
            parts = b""


def wandb_history(sessions, keys):
    """{step: {metric: value}} of every history row the sessions wrote (a step twice fails)."""
    rows = {}
    for session in sessions:
        for record in wandb_records(next(session.glob("*.wandb"))):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): item for item in record.history.item}
                values = {key: json.loads(item.value_json) for key, item in items.items() if key in keys}
                if values:
                    assert record.history.step.num not in rows, record.history.step.num
                    rows[record.history.step.num] = values
    return rows


def wandb_config(session):
    (run,) = [r.run for r in wandb_records(next(session.glob("*.wandb")))
              if r.WhichOneof("record_type") == "run"]
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def test_wandb_offline_run_in_the_run_folder_is_reopened_by_a_resume(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # not logged in: auto is offline
    runs = tmp_path / "runs"
    signal_at(monkeypatch, [10])
    assert train_random(runs, "train.loggers=[wandb]", "train.epochs=1").exit_code == 130
    folder = the_run(runs)
    state = json.loads((folder / "meta.json").read_text())["trackers"]["wandb"]
    assert state["mode"] == "offline" and state["project"] == "digits_cnn"
    result = train_random(runs, resume=folder.name)
    assert result.exit_code == 0, result.stderr
    assert result.last_line == folder.name  # W&B's messages stay off stdout

    sessions = sorted((folder / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(sessions) == 2  # the same W&B run, twice
    expected: dict[int, dict] = {}
    for record in records(folder):
        expected.setdefault(record["step"], {}).update(scalars(record))
    keys = {key for values in expected.values() for key in values}
    import wandb

    wandb.teardown()  # as the end of a kdl process does: W&B's service writes out its files
    assert wandb_history(sessions, keys) == expected
    config = wandb_config(sessions[-1])
    assert config["optimizer.lr"] == 0.015 and config["model.channels"] == [8, 16]
    saved = sessions[-1] / "files" / folder.name  # kdl's files, apart from W&B's own
    assert (saved / "summary.json").read_text() == (folder / "summary.json").read_text()
    assert (saved / "config.yaml").read_text() == (folder / "config.yaml").read_text()


def test_wandb_auto_mode_is_online_only_when_logged_in(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") is None  # W&B reads WANDB_MODE itself
    assert wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert wandb_mode("auto") == "online"


def test_loggers_are_checked_and_the_default_keeps_the_config_hash(tmp_path):
    config = CONFIGS / "digits_cnn.yaml"
    result = kdl("validate", config, "--set", "train.loggers=[mlflow,mlflow]")
    assert result.exit_code == 2 and "train.loggers" in result.stderr and "mlflow" in result.stderr
    result = kdl("validate", config, "--set", "train.loggers=[neptune]")
    assert result.exit_code == 2 and "train.loggers" in result.stderr
    raw = yaml.safe_load(config.read_text())
    spelled_out = {**raw, "train": {**raw.get("train", {}), "loggers": ["tensorboard"],
                                    "mlflow": {"tracking_uri": None}, "wandb": {"mode": "auto"}}}
    assert resolve(raw).hash() == resolve(spelled_out).hash()
    assert resolve(raw).hash() != resolve({**raw, "train": {**raw.get("train", {}), "loggers": []}}).hash()
