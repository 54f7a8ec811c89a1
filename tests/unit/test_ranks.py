"""How training processes share a batch and agree to stop, without starting any."""

from __future__ import annotations

import inspect
import json
import os
import signal

import pytest
import torch
from kdl import CONFIGS

from karpathy_runner import workers
from karpathy_runner.config.loading import load_config
from karpathy_runner.data import BatchDataset, Batches
from karpathy_runner.distributed import Ranks, _forward_buffer_sync, _machines, shard
from karpathy_runner.errors import KdlError
from karpathy_runner.launcher import _error_lines, launch
from karpathy_runner.session import _check_processes


def test_each_rank_takes_every_nth_item_of_each_global_batch():
    order = torch.arange(10)
    assert shard(order, 0, 2).tolist() == [0, 2, 4, 6, 8]
    assert shard(order, 1, 3).tolist() == [1, 4, 7]

    class Items(BatchDataset):
        def __len__(self):
            return 11

        def get_batch(self, indices):
            return (indices,)

    ranks = [Batches(Items(), 4, seed=3, shuffle=True, rank=r, world=2) for r in range(2)]
    alone = Batches(Items(), 4, seed=3, shuffle=True)
    assert len(ranks[0]) == len(alone) == 3
    for together, whole in zip(zip(*(b.epoch(1) for b in ranks), strict=True), alone.epoch(1),
                               strict=True):
        assert sorted(torch.cat([t[0] for t in together]).tolist()) == sorted(whole[0].tolist())
    # a last global batch with fewer items than processes is left out (one item for two here)
    assert len(Batches(Items(), 5, rank=0, world=2)) == 2
    # the loss weights give the mean over the whole batch: 3 and 2 items of 5
    assert [Ranks(r, 2).loss_scale(5) for r in range(2)] == [1.2, 0.8]


def test_a_signal_that_lands_while_the_ranks_compare_is_not_lost():
    """The stop agreement is an all-reduce; a signal handled while it runs must survive its
    answer ('no stop yet') and be compared at the next step, or that rank never stops."""
    from types import SimpleNamespace

    from karpathy_runner.loop import Trainer
    from karpathy_runner.signals import Stop

    stop = Stop()

    class Comparing(Ranks):
        def largest(self, value: int) -> int:  # the other rank: no signal; this one: one lands now
            if stop.signum is None:
                stop.signum = signal.SIGTERM
            return value

    trainer = SimpleNamespace(ranks=Comparing(0, 2), stop=stop, tell_signal=lambda: None)
    assert Trainer._stopping(trainer) is False  # this step's answer: nobody had stopped
    assert stop.signum == signal.SIGTERM  # kept
    assert Trainer._stopping(trainer) is True  # and agreed at the next step


def test_machines_that_start_different_numbers_of_processes_refuse_together(monkeypatch):
    """torchrun lets each machine start a number of its own; kdl's runs over several machines
    train, and resume, as many on each (the resume line names one --nproc-per-node). Counts of
    1, 2 and 3: every process refuses, those of the machine of 2 (the mean) included."""
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")
    machines = []
    for here in (1, 2, 3):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(here))
        machines.append(Together(0, 6, 0, "gloo", None, *_machines(6)))
    assert [(r.nodes, r.here, r.even) for r in machines] == [(3, 1, False), (3, 2, True), (3, 3, False)]
    monkeypatch.delenv("GROUP_WORLD_SIZE")  # (a torchrun that does not say: equal counts)
    assert _machines(6) == (2, 3)

    cfg = load_config(CONFIGS / "digits_cnn.yaml")
    for ranks in machines:  # the others' answers: the same config, not the same counts
        ranks.answers = iter([True, False])
        with pytest.raises(KdlError) as refused:
            _check_processes(cfg, ranks, "cpu")
        assert str(refused.value).startswith(
            f"the machines were not all given the same --nproc-per-node: 6 training processes on 3 "
            f"machines, {ranks.here} of them on this one. Run the same command on every machine")
    for here in (1, 2, 3):  # the same count on every machine
        ranks = Together(0, 3 * here, 0, "gloo", None, 3, here)
        ranks.answers = iter([True, True, True])
        _check_processes(cfg, ranks, "cpu")


class Together(Ranks):
    """A process among others that were all given the same config: its collectives, with the
    `answers` of the others to each check in turn."""

    answers = iter(())

    def share(self, value: object) -> object:
        return value

    def all_true(self, flag: bool) -> bool:
        return next(self.answers) and flag


def test_the_buffer_sync_switch_has_the_name_the_installed_torch_gives_it(monkeypatch):
    """Over one process kdl turns off DDP's broadcast of rank 0's buffers at each forward: the
    switch is forward_sync_buffers since torch 2.13, broadcast_buffers before (torch 2.11 on the
    project's GPU machine), which pyproject's torch>=2.6 allows."""
    assert _forward_buffer_sync() in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters

    class Before:  # DDP's signature before torch 2.13, in part
        def __init__(self, module, device_ids=None, broadcast_buffers=True, find_unused_parameters=False):
            pass

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", Before)
    assert _forward_buffer_sync() == "broadcast_buffers"


def test_the_launcher_leaves_the_threads_of_one_process_a_machine_as_they_are(monkeypatch):
    """torchrun gives its workers OMP_NUM_THREADS=1 only when a machine runs several of them
    (they would share its cores) and never over the user's own; one process a machine (a
    one-GPU DDP run) keeps torch's default, every core, as the plain run does."""
    import torch.distributed.run

    seen = []
    monkeypatch.setattr(torch.distributed.run, "run",
                        lambda args: seen.append(os.environ.get("OMP_NUM_THREADS")))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for nproc in (1, 2):
        assert launch(["train", "config.yaml"], nproc, 1, 0, "127.0.0.1", None) == 0
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch(["train", "config.yaml"], 2, 1, 0, "127.0.0.1", None) == 0
    assert seen == [None, "1", "3"]


def test_a_run_records_the_command_its_user_ran(monkeypatch):
    """A worker of kdl's launcher records the launcher's command (with --nproc-per-node); a
    process torchrun did not start, or a worker of the user's own torchrun, its own arguments,
    whatever the environment holds besides (a value that is no command line is not one)."""
    launched = ["kdl", "train", "config.yaml", "--nproc-per-node", "2"]
    monkeypatch.setenv(workers.LAUNCHED_AS, json.dumps(launched))
    assert workers.command_line(["train", "config.yaml"]) == ["kdl", "train", "config.yaml"]  # no worker
    for key in workers.LAUNCH_ENV:
        monkeypatch.setenv(key, "0")
    assert workers.command_line(["train", "config.yaml", "--runs-dir", "runs"]) == launched
    for stray in ("not json", "{}", "[]", "[1]", '"kdl train"'):
        monkeypatch.setenv(workers.LAUNCHED_AS, stray)
        assert workers.command_line(["train", "config.yaml"]) == ["kdl", "train", "config.yaml"]
    monkeypatch.delenv(workers.LAUNCHED_AS)
    assert workers.command_line(["train", "config.yaml"]) == ["kdl", "train", "config.yaml"]


def test_the_errors_of_the_workers_are_said_once_each_with_the_ranks_where_they_differ():
    assert _error_lines({1: "no data", 0: "no data"}) == ["error: no data"]
    assert _error_lines({1: "no data"}) == ["error: no data"]  # rank 0 stopped before it said it
    assert _error_lines({3: "c", 1: "b", 2: "b"}) == ["error: ranks 1, 2: b", "error: rank 3: c"]
    assert _error_lines({}) == []
