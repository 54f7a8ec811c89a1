"""Data-parallel training through torchrun: two gloo processes on the CPU, as real processes."""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kdl import CONFIGS, kdl
from kill_at import parent_of
from stopping import (
    assert_same_tensors,
    assert_same_training,
    final_state,
    free_port,
    launch,
    one_thread,
    only_run,
    output,
    read_json,
    sets,
    train_command,
    wait_for,
)

from karpathy_runner import session, workers
from karpathy_runner.cli.train import _processes_of
from karpathy_runner.distributed import Ranks
from karpathy_runner.errors import KdlError
from karpathy_runner.plan import plan_train

# no dropout and no batch norm: what makes two processes on half batches do exactly the
# single-process arithmetic (up to the order of float additions in the gradient all-reduce);
# an odd batch size, so that the ranks' shards differ (32 and 31 items) and each rank's loss
# must be weighted by its share of the batch (Ranks.loss_scale)
PLAIN = ["model.channels=[8,16]", "model.batch_norm=false", "model.dropout=0",
         "data.batch_size=63", "train.device=cpu", "train.log_every_steps=3",
         "train.checkpoint_every_steps=4", "train.epochs=6"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A single-process run and a two-process run of the same config, and the latter's folder."""
    root = tmp_path_factory.mktemp("ddp")
    alone = launch(root / "alone", *train_command(*PLAIN))
    together = launch(root / "together", *train_command(*PLAIN), "--nproc-per-node", "2")
    assert alone.wait(timeout=240) == 0, output(alone)
    assert together.wait(timeout=240) == 0, output(together)
    return root, output(together)


def test_two_processes_train_like_one_with_the_same_global_batch(two_processes):
    root, printed = two_processes
    folder = only_run(root / "together")  # one run folder, written by rank 0 alone
    assert printed.strip().splitlines()[-1] == folder.name  # the id, printed once
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "completed" and meta["processes"] == 2 and meta["backend"] == "gloo"
    assert meta["command"][-3:] == ["--nproc-per-node", "2", "--quiet"]  # the launcher's, as run
    alone, together = final_state(only_run(root / "alone")), final_state(folder)
    assert together["loop"]["step"] == alone["loop"]["step"] == 126
    for name, weight in alone["models"]["model"].items():
        torch.testing.assert_close(together["models"]["model"][name], weight, rtol=1e-5, atol=1e-6)
    # metrics are over both processes' items: the single run's numbers, each step once
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in
              (only_run(root / "alone") / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(r["step"], r["split"]) for r in single]
    for mine, theirs in zip(records, single, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-9)
    assert (folder / "train.log").read_text().count("started") == 1


def _worker(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker of `rank` that `launcher` started."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = parent_of(int(pid))
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


def _stopped(runs: Path, *args: str, target: str, signum: int = signal.SIGTERM,
             ) -> tuple[Path, int, str]:
    """A two-process run of PLAIN (and `args`) sent `signum` once it has a checkpoint, to the
    launcher or a worker (`target`): its folder, the launcher's exit code and output."""
    # the launcher: signalled by rank 0 itself as it writes its first last.pt (at step 4), so
    # that a busy machine never lets the short run end first (tests/sitehook)
    hook = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "sitehook"),
                                           os.environ.get("PYTHONPATH", "")]),
            "KDL_TEST_SIGNAL": f"last.pt:1:{signal.Signals(signum).name}:parent"}
    process = launch(runs, *train_command(*PLAIN, *args), "--nproc-per-node", "2",
                     env=hook if target == "launcher" else None, start_new_session=True)
    try:
        if target != "launcher":
            wait_for(lambda: any(runs.glob("*/checkpoints/last.pt")) or process.poll() is not None,
                     timeout=180)
            assert process.poll() is None, "the run ended before the signal: " + output(process)
            os.kill(_worker(process.pid, 1), signum)
        code = process.wait(timeout=240)
    finally:  # whatever failed, no process of the run outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return only_run(runs), code, output(process)


def test_sigterm_to_the_launcher_stops_every_rank_and_the_run_resumes_exactly(tmp_path,
                                                                              two_processes):
    """torchrun forwards SIGTERM to the workers: every rank stops after the same step with a
    checkpoint, exit 143; the resumed run ends with the weights and metrics of the
    uninterrupted two-process run."""
    runs = tmp_path / "runs"
    folder, code, printed = _stopped(runs, target="launcher")
    assert code == 143, printed
    # kdl's processes say how they stop; torchrun's lines as it passes the signal on are left out
    assert "death signal" not in printed and "closing signal" not in printed, printed
    assert read_json(folder / "meta.json")["status"] == "interrupted", printed
    assert 0 < final_state(folder)["loop"]["step"] < 126
    # the resume line as the run printed it: two processes again, without being told
    (hint,) = re.findall(r"resume with `kdl train (--resume \S+)`", printed)
    resumed = launch(runs, *hint.split())
    assert resumed.wait(timeout=240) == 0, output(resumed)
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "completed"
    assert meta["resumes"][-1]["command"] == ["kdl", "train", *hint.split(), "--quiet"]  # as run
    assert_same_training(folder, only_run(two_processes[0] / "together"))


# a run long enough that the signal, sent once the first checkpoint is there, always finds it
# training (6 epochs of this tiny model can end before the worker's pid is found on a busy machine)
LONG = "train.epochs=60"


def test_sigterm_to_one_worker_stops_both_after_the_same_step(tmp_path):
    folder, code, printed = _stopped(tmp_path / "runs", LONG, target="rank1")
    assert code == 143, printed
    # kdl's own resume line and the run id end the output, without torchrun's line about the
    # worker's exit 143 after them
    assert "failed (exitcode" not in printed and "with a checkpoint; resume with" in printed, printed
    meta = read_json(folder / "meta.json")
    assert meta["status"] == "interrupted" and meta["step"] == final_state(folder)["loop"]["step"]


def test_a_rank_that_dies_stops_the_others_and_leaves_a_resumable_run(tmp_path):
    runs = tmp_path / "runs"
    folder, code, printed = _stopped(runs, LONG, target="rank1", signum=signal.SIGKILL)
    assert code == 128 + signal.SIGKILL, printed
    assert "failed (exitcode: -9)" in printed  # a worker killed says nothing: torchrun's line stays
    # rank 0 fails in its next collective, or torchrun stops it before: failed, or crashed;
    # either resumes from its last checkpoint (the launcher test resumes one to the end)
    assert read_json(folder / "meta.json")["status"] in ("failed", "running"), printed
    plan = plan_train(None, [], runs, resume=folder.name, lock=False)
    assert plan.run is not None and plan.run.status in ("failed", "crashed")
    assert 0 < final_state(folder)["loop"]["step"] < 60 * 21


def test_a_checkpoint_resumes_only_with_as_many_processes(two_processes, tmp_path):
    """Asked for another number of processes, a resume refuses and names the command that works
    (with the runs folder it was given, one KDL_RUNS_DIR does not name)."""
    folder = only_run(two_processes[0] / "together")
    resumed = launch(folder.parent, "--resume", folder.name, "--nproc-per-node", "1", "--set",
                     "train.epochs=3", "--allow-changes", "--runs-dir", str(folder.parent),
                     env={"KDL_RUNS_DIR": str(tmp_path / "elsewhere")})
    assert resumed.wait(timeout=240) == 2, output(resumed)
    assert (f"written by a run of 2 process(es); resume it with as many: kdl train --resume "
            f"{folder.name} --runs-dir {folder.parent} --nproc-per-node 2") in output(resumed)


def _skip_step_rank(rank: int, init_file: str, results: multiprocessing.Queue) -> None:
    """One of two gloo processes: rank 1's loss is NaN, rank 0's finite; both run one step."""
    from karpathy_runner.updater import Updater

    torch.set_num_threads(1)  # forked: no OpenMP thread team of the test process to lean on

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        before = [p.detach().clone() for p in model.parameters()]
        updater = Updater({"model": torch.optim.SGD(model.parameters(), lr=0.1)}, [model], "fp32",
                          torch.device("cpu"), None, True, Ranks(rank, 2))
        updater.begin_step()
        loss = model(torch.ones(2, 3)).mean() * (float("nan") if rank == 1 else 1.0)
        updater.step("model", loss)
        updater.end_step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        results.put((rank, updater.skipped, unchanged))
    finally:
        torch.distributed.destroy_process_group()


def test_skip_step_is_decided_by_all_ranks_together(tmp_path):
    """on_nonfinite: skip_step with a non-finite loss on one rank only: every rank skips the
    step (none waits alone in the gradient all-reduce) and no weight moves anywhere."""
    results = forked_ranks(_skip_step_rank, lambda rank: (rank, str(tmp_path / "init")), timeout=60)
    assert sorted(results) == [(0, True, True), (1, True, True)]


# ----------------------------------------------------------------------------- forked workers


def _worker_rank(rank: int, world: int, port: int, runs: Path, config: str, overrides: list[str],
                 patch: Callable[[], None] | None, results: multiprocessing.Queue) -> None:
    """Rank `rank` of `world` torchrun workers of `kdl train CONFIG --set OVERRIDES`, as
    `python -m karpathy_runner` runs one (session.train): its exit code and summary, or what it
    raised (a refusal's exit code, or None)."""
    torch.set_num_threads(1)  # forked: as OMP_NUM_THREADS=1 does for a launched worker
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if patch is not None:
        patch()
    try:
        plan = plan_train(config, overrides, runs, lock=rank == 0, claim=False)
        result = session.train(plan, runs, ["kdl", "train", config], quiet=True)
        results.put((rank, result.exit_code, result.summary))
    except Exception as exc:
        results.put((rank, exc.exit_code if isinstance(exc, KdlError) else None, str(exc)))


def two_workers(runs: Path, config: Path, *overrides: str, patch: Callable[[], None] | None = None,
                world: int = 2) -> list[tuple[int, int, Any]]:
    """Two (or `world`) training processes forked from this one (no torch import each: seconds
    sooner than torchrun's), each one's (rank, exit code, summary or refusal) in rank order.
    `patch` runs in each before it trains."""
    port = free_port()
    results = forked_ranks(_worker_rank, lambda rank: (rank, world, port, runs, str(config), list(overrides),
                                                       patch), timeout=120, world=world)
    return sorted(results, key=lambda result: result[0])


def forked_ranks(target: Callable[..., None], args: Callable[[int], tuple[Any, ...]], timeout: float,
                 world: int = 2) -> list[Any]:
    """What two (or `world`) processes forked from this one (no torch import each: seconds sooner
    than torchrun's) put on their queue: `target(*args(rank), queue)` in each."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=target, args=(*args(rank), results)) for rank in range(world)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(timeout=timeout)
            assert worker.exitcode == 0, "a rank hung or failed"
    finally:  # a rank left waiting in a collective must not outlive the test
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    return [results.get(timeout=5) for _ in workers]


@pytest.mark.parametrize("config, overrides", [
    ("digits_cnn.yaml", ["model.channels=[8,16]", "model.batch_norm=true"]),
    # G trains every other step: its forward through its wrapper without a backward between
    ("digits_gan.yaml", ["model.width=8", "model.latent_size=4", "task.d_steps=2"]),
    ("digits_vae.yaml", ["model.width=8"]),
], ids=["cnn", "gan", "vae"])
def test_every_rank_evaluates_the_model_rank_0_saves(tmp_path, config, overrides):
    """Batch norm: between forwards each rank holds its own share's running statistics (DDP
    gives every rank rank 0's at the next forward); before a validation every rank takes rank
    0's, so all compute the checkpointed model's metrics and take the same decisions (best
    checkpoint, early stopping). The weights agree because every trained model's gradients are
    averaged: a GAN's two phases, a VAE's decoder."""
    (_, code0, summary0), (_, code1, summary1) = two_workers(
        tmp_path / "runs", CONFIGS / config, *overrides, "train.epochs=1", "train.device=cpu",
        "data.batch_size=63")
    assert code0 == code1 == 0, (summary0, summary1)
    val = {k: v for k, v in summary0["final"].items() if k.startswith("val.")}
    assert val and val == {k: v for k, v in summary1["final"].items() if k.startswith("val.")}


def test_a_model_trained_outside_its_wrapper_stops_the_run_before_a_checkpoint(tmp_path):
    """A family whose step calls `models[name]` instead of `wrapped(name)` trains each rank on its
    own share, unaveraged: at the first checkpoint every rank sees that the weights differ and
    stops with exit 2 naming the fix, before anything is saved. Workers of kdl's launcher leave
    the error for it to say once (test_machines: how it says them)."""
    errors = tmp_path / "errors"  # the launcher's folder for its workers' errors
    errors.mkdir()

    def unwrapped() -> None:
        from karpathy_runner.tasks import Task

        Task.wrapped = lambda self, name: self.models[name]
        os.environ[workers.ERRORS] = str(errors)

    runs = tmp_path / "runs"
    results = two_workers(runs, CONFIGS / "digits_cnn.yaml", *PLAIN[:3], "train.epochs=1",
                          "train.device=cpu", "data.batch_size=63", patch=unwrapped)
    assert [(code, summary["status"]) for _, code, summary in results] == [(2, "failed")] * 2, results
    folder = only_run(runs)
    assert "must call each model it trains through self.wrapped(name)" in (folder / "train.log").read_text()
    assert not any(folder.glob("checkpoints/*.pt"))
    left = workers.left_errors(str(errors))
    assert sorted(left) == [0, 1] and left[0] == left[1] == read_json(folder / "meta.json")["error"], left


def test_a_last_batch_with_fewer_items_than_processes_is_left_out_on_every_rank(tmp_path):
    """1,294 digits in global batches of 431: three batches of 216 + 215 items (each rank's loss
    weighted by its share) and a fourth of one item, which would leave rank 1 nothing to forward
    while DDP waits for its gradients. Both ranks leave it out and take the same 3 steps, to the
    weights of one process trained on those three batches."""
    plain = [*PLAIN[:3], "data.batch_size=431", "train.device=cpu", "train.epochs=1",
             "scheduler.name=none"]
    results = two_workers(tmp_path / "two", CONFIGS / "digits_cnn.yaml", *plain)
    assert [(code, summary["steps"]) for _, code, summary in results] == [(0, 3), (0, 3)], results
    with one_thread():
        alone = kdl("train", CONFIGS / "digits_cnn.yaml", *sets([*plain, "train.max_steps=3"]),
                    "--runs-dir", tmp_path / "one", "--quiet")
    assert alone.exit_code == 0, alone.stderr
    two, one = final_state(only_run(tmp_path / "two")), final_state(only_run(tmp_path / "one"))
    for name, weight in one["models"]["model"].items():
        torch.testing.assert_close(two["models"]["model"][name], weight, rtol=1e-5, atol=1e-6)


def test_sync_batch_norm_is_refused_on_the_cpu_and_reaches_the_models(tmp_path):
    """torch's SyncBatchNorm syncs CUDA tensors only: several CPU processes refuse
    train.sync_batch_norm before any folder exists. Let through, torch's own check fails as the
    models are wrapped: the option made their batch norms SyncBatchNorm."""
    runs = tmp_path / "runs"
    asked = ["model.channels=[8,16]", "train.sync_batch_norm=true", "train.device=cpu"]
    refused = two_workers(runs, CONFIGS / "digits_cnn.yaml", *asked)
    assert [code for _, code, _ in refused] == [2, 2]
    assert "train.sync_batch_norm: true, but these 2 processes train on the CPU" in refused[0][2]
    assert not runs.exists() or not any(runs.iterdir())

    def let_through() -> None:
        session._check_processes = lambda cfg, ranks, device: None

    for _, code, error in two_workers(runs, CONFIGS / "digits_cnn.yaml", *asked, patch=let_through):
        assert code is None and "SyncBatchNorm layers only work with GPU modules" in error, error


def test_one_torchrun_process_trains_through_ddp_to_the_plain_runs_weights(tmp_path):
    """torchrun with one process (how a one-GPU DDP run is launched) trains each model through
    DistributedDataParallel as any number of processes does, to the weights of the run without
    torchrun, bit for bit (DDP's average over one process is the gradient itself). Over one
    process train.sync_batch_norm is batch norm: it trains on the CPU too."""
    asked = ["model.channels=[8,16]", "model.batch_norm=true", "train.sync_batch_norm=true",
             "train.device=cpu", "train.epochs=1", "train.max_steps=6", "data.batch_size=64"]
    wrapped = tmp_path / "wrapped"

    def record_wrappers() -> None:
        made = torch.nn.parallel.DistributedDataParallel.__init__

        def init(self, module, *args, **kwargs) -> None:
            with wrapped.open("a") as file:
                file.write(" ".join(type(m).__name__ for m in module.modules() if "Norm" in type(m).__name__))
                file.write("\n")
            made(self, module, *args, **kwargs)

        torch.nn.parallel.DistributedDataParallel.__init__ = init

    [(_, code, summary)] = two_workers(tmp_path / "torchrun", CONFIGS / "digits_cnn.yaml", *asked,
                                       patch=record_wrappers, world=1)
    assert (code, summary["steps"]) == (0, 6), summary
    assert wrapped.read_text() == "BatchNorm2d BatchNorm2d\n"  # one wrapper, plain batch norms
    # told from a run without torchrun, and resumed as it was started: through torchrun
    meta = read_json(only_run(tmp_path / "torchrun") / "meta.json")
    assert (meta["processes"], meta["nodes"], meta["backend"]) == (1, 1, "gloo")
    assert _processes_of(tmp_path / "torchrun", only_run(tmp_path / "torchrun").name) == 1
    with one_thread():
        alone = kdl("train", CONFIGS / "digits_cnn.yaml", *sets(asked), "--runs-dir", tmp_path / "alone",
                    "--quiet")
    assert alone.exit_code == 0, alone.stderr
    assert_same_tensors(final_state(only_run(tmp_path / "torchrun"))["models"],
                        final_state(only_run(tmp_path / "alone"))["models"])
    assert _processes_of(tmp_path / "alone", only_run(tmp_path / "alone").name) is None


def _one_process_steps(port: int, results: multiprocessing.Queue) -> None:
    """A world of one gloo process: five training steps of a model with batch norm through
    its wrapper, and of its copy alone, side by side: the collectives the wrapper's last three
    steps ran, whether the gradients are the same at each step, and whether they are tensors of
    their own (views into one of DDP's buckets once its reducer ran)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                         world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        alone = copy.deepcopy(model)
        wrapped = Ranks(0, 1, 0, "gloo").wrap(model)
        same = []

        def step(batch: torch.Tensor) -> None:
            for net in (wrapped, alone):
                net.zero_grad()
                net(batch).square().mean().backward()
            same.append(all(torch.equal(a.grad, b.grad)
                            for a, b in zip(model.parameters(), alone.parameters(), strict=True)))

        first, second, *later = torch.randn(5, 8, 3)
        step(first)
        step(second)  # (where a DDP whose reducer runs rebuilds its buckets, once: not profiled)
        with torch.profiler.profile() as profile:
            for batch in later:
                step(batch)
        ran = sorted({event.name for event in profile.events() if event.name.startswith(("c10d::", "gloo:"))})
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        results.put((ran, same, len(storages) == len(list(model.parameters()))))
    finally:
        torch.distributed.destroy_process_group()


def test_one_process_ddp_runs_no_collective_and_keeps_the_gradients(tmp_path):
    """Over one process DistributedDataParallel's exchanges cannot change a bit: rank 0's
    buffers at each forward are this process's own, and the average of one process's gradients
    is the gradients. kdl's wrapper skips the broadcast and leaves DDP's reducer out of the
    backward (bench/ddp_step.py: most of DDP's cost a step): no collective runs, the gradients
    stay in the parameters as the model alone leaves them, and they are its gradients, bit for
    bit, at every step."""
    [(ran, same, own)] = forked_ranks(_one_process_steps, lambda rank: (free_port(),), timeout=60, world=1)
    assert ran == [] and same == [True] * 5 and own, (ran, same, own)


def test_two_machines_of_one_process_train_as_one_machine_of_two(two_processes, tmp_path):
    """torchrun over two "machines" (two launchers here, one rendezvous): global rank 0 runs on
    the machine of --node-rank 0 and writes the run into its runs folder, and its launcher
    prints the id; the other machine writes nothing (on real machines the runs folder must be
    one they share: a resume reads the checkpoint on each). A Ctrl-C on machine 0 after the
    first checkpoint stops both (exit 130), and the resume line it prints, run on each machine
    with its own --node-rank, ends with the weights of one machine of two processes, bit for bit."""
    port = str(free_port())
    ctrl_c = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "sitehook"),
                                             os.environ.get("PYTHONPATH", "")]),
              "KDL_TEST_SIGNAL": "last.pt:1:SIGINT:parent"}  # to machine 0's launcher, from rank 0
    nodes = [launch(tmp_path / f"node{rank}", *train_command(*PLAIN), "--nproc-per-node", "1",
                    "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                    "--master-port", port, env=ctrl_c if rank == 0 else None, start_new_session=True)
             for rank in range(2)]
    try:
        assert [node.wait(timeout=240) for node in nodes] == [130, 130], [output(n) for n in nodes]
        folder = only_run(tmp_path / "node0")
        assert output(nodes[0]).strip().splitlines()[-1] == folder.name
        assert folder.name not in output(nodes[1])
        assert not any((tmp_path / "node1").iterdir())
        meta = read_json(folder / "meta.json")
        assert meta["status"] == "interrupted" and (meta["processes"], meta["nodes"]) == (2, 2)
        assert 0 < final_state(folder)["loop"]["step"] < 126
        # the resume line, as machine 0 printed it: there, and with --node-rank 1 on the other
        (hint,) = re.findall(r"resume with `kdl train ([^`]*)` here, and the same with its own "
                             r"--node-rank on each other machine", output(nodes[0]))
        assert hint.split()[:2] == ["--resume", folder.name] and "--node-rank 0" in hint
        nodes = [launch(tmp_path / "node0", *hint.replace("--node-rank 0", f"--node-rank {rank}").split(),
                        start_new_session=True) for rank in range(2)]
        assert [node.wait(timeout=240) for node in nodes] == [0, 0], [output(n) for n in nodes]
    finally:  # a launcher left waiting for the other must not outlive the test
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    assert read_json(folder / "meta.json")["status"] == "completed"
    assert_same_tensors(final_state(folder)["models"],
                        final_state(only_run(two_processes[0] / "together"))["models"])
    # resumed on one machine without its launch options: the command for each machine, named
    refused = kdl("train", "--resume", folder.name, "--runs-dir", folder.parent)
    assert refused.exit_code == 2, refused.stderr
    assert (f"resume it on each machine with kdl train --resume {folder.name} --runs-dir "
            f"{folder.parent} --nproc-per-node 1 --nnodes 2 --node-rank N"
            ) in " ".join(refused.stderr.split()), refused.stderr


def test_machines_given_different_configs_refuse_together_before_anything_is_written(tmp_path):
    """The machines' commands must give the same config: one whose learning rate differs used to
    train a whole epoch, each machine its own way, and stop on weights that differ, blamed on a
    model trained outside its wrapper."""
    runs, port = tmp_path / "runs", free_port()
    config = str(CONFIGS / "digits_cnn.yaml")
    results = forked_ranks(_worker_rank, lambda rank: (
        rank, 2, port, runs, config, [*PLAIN, f"optimizer.lr={0.01 * (rank + 1)}"], None), timeout=120)
    assert sorted(code for _, code, _ in results) == [2, 2], results
    for _, _, error in results:
        assert str(error).startswith("the training processes were not all given the same config"), error
    assert not runs.exists() or not any(runs.iterdir())
