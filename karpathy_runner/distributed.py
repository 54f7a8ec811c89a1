"""Data-parallel training over several processes, launched by PyTorch's own torchrun.

`kdl train CONFIG --nproc-per-node N` runs torch.distributed.run on kdl's own entry point
(`python -m karpathy_runner train ...`: launcher.py), exactly as `torchrun -m karpathy_runner train ...`
does; each process it starts finds itself a worker from the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Backends: nccl on CUDA, one GPU per
process (cuda:LOCAL_RANK); gloo on the CPU. Small decisions every rank must take together (stop
after this step, skip this step) go over a gloo group even under nccl, so they never wait on
the GPU.

`data.batch_size` is the global batch: each optimizer step consumes one batch of the (seed,
epoch) permutation, and rank r takes its items r, r + N, r + 2N, ... (`shard`). Shards differ
by one item at most, and a last batch with fewer items than ranks is left out (`Batches`), so
every rank runs every step with at least one item: no rank waits alone in a collective, and no
DDP `join` is needed. Each trained model goes through torch's DistributedDataParallel (`wrap`),
which starts every rank from rank 0's weights and buffers and averages the gradients (sum /
N) during the backward pass; each rank's loss is weighted by its share of the batch
(`loss_scale`), so the average is the gradient of the mean over the whole batch, a
single-process step. Batch norm normalises each rank's share, and DDP gives every rank rank 0's
buffers (running statistics) at each forward; `train.sync_batch_norm` normalises over the whole
batch instead (torch's SyncBatchNorm: CUDA only). Only rank 0 writes the run folder.
"""

from __future__ import annotations

import datetime as dt
import gc
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import KdlError
from .workers import in_worker

# how long a rank waits for the others in one collective before failing (not hanging forever)
TIMEOUT = dt.timedelta(minutes=10)


def shard(chunk: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s items of one global batch (indices into the dataset): every world-th."""
    return chunk if world == 1 else chunk[rank::world]


@dataclass
class Ranks:
    """This process's place among the training processes, and the collectives the loop uses.
    The default is one process alone: every collective is then the identity."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    control: Any = None  # the gloo group for host-side decisions
    nodes: int = 1  # machines the processes run on
    here: int = 1  # of the processes, those on this process's machine (its --nproc-per-node)

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def even(self) -> bool:
        """Each machine runs as many processes, as kdl's runs over several machines train and
        resume (torchrun also lets each machine start a number of its own)."""
        return self.world == self.nodes * self.here

    def draw(self, step: int) -> int:
        """The index of a step's random augmentation draw: distinct per rank and step."""
        return step * self.world + self.rank

    def loss_scale(self, batch_items: int) -> float:
        """What this rank's mean loss is multiplied by so that the average of the ranks'
        gradients is the gradient of the mean over the whole batch of `batch_items`."""
        local = len(range(self.rank, batch_items, self.world))
        return self.world * local / batch_items

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([0 if flag else 1], dtype=torch.int64)
        torch.distributed.all_reduce(value, group=self.control)
        return int(value) == 0

    def largest(self, value: int) -> int:
        """The largest of the ranks' values (a signal number, or 0 for none)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.control)
        return int(tensor)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks of a float tensor on the training device."""
        if self.world > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
        return values

    def wrap(self, model: nn.Module, sync_batch_norm: bool = False) -> nn.Module:
        """What a training forward of `model` goes through: the model itself for one process
        that torchrun did not start; for torchrun's processes, a world of one too (what a user
        of `--nproc-per-node 1` expects), its DistributedDataParallel wrapper (rank 0's weights
        and buffers on every rank as it is made), whose forward readies the gradient averaging
        of the backward pass that follows (over one process there is nothing to average:
        `_OneProcessDDP`). `sync_batch_norm`, with several processes: its batch norms become
        SyncBatchNorm first, holding the same parameters and buffers (so its optimizer and
        checkpoints are unchanged); over one process it would be plain batch norm."""
        if self.backend is None:
            return model
        if sync_batch_norm and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.world == 1:  # nothing to exchange (_OneProcessDDP)
            return _OneProcessDDP(model, find_unused_parameters=False, **{_forward_buffer_sync(): False})
        # DDP's default for buffers: rank 0's on every rank at each forward, one model as a
        # single process carries it (batch-norm statistics, the spectral norm's vectors its
        # forward uses). find_unused_parameters off: a backward reaches all of a wrapped model's
        # parameters or none (a phase that holds it fixed, a skipped step), which DDP allows
        # without searching the graph at every forward. The gradients are views into DDP's
        # buckets: no copy into them and back at each step (bench/ddp_step.py), half the memory
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False,
                                                         gradient_as_bucket_view=True)

    def broadcast_buffers(self, models: list[nn.Module]) -> None:
        """Rank 0's buffers on every rank. Between forwards each rank holds the statistics of its
        own share (DDP gives rank 0's at the next one): made the same before every rank
        evaluates, so all take the same decisions (best checkpoint, early stopping)."""
        if self.world == 1:
            return
        for model in models:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def check_same(self, params: list[torch.Tensor]) -> None:
        """Refuse to go on from weights that differ between the ranks: a model trained outside its
        DDP wrapper (a task's step calling `models[name]`, not `wrapped(name)`) gets its
        gradients averaged on no rank, and each rank drifts its own way. One fingerprint a rank,
        the sum of the weights in float64: DDP's averaged gradients keep them equal bit for bit."""
        if self.world == 1 or not params:
            return
        fingerprint = torch.stack([p.detach().double().sum() for p in params]).sum().cpu()
        spread = torch.stack([fingerprint, -fingerprint])  # the largest and minus the smallest
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX, group=self.control)
        if float(spread[0]) != -float(spread[1]):
            raise KdlError(
                "the training processes' weights differ: a model was trained without its "
                "DistributedDataParallel wrapper, so its gradients were never averaged. A task's "
                "train_step must call each model it trains through self.wrapped(name) (see "
                "docs/extending.md); nothing of this step was saved"
            )

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` (a picklable value) on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.primary else None
        torch.distributed.gather_object(obj, out, dst=0, group=self.control)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.control)

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            # gloo's finished work objects hold tensors; freed now, not by the exiting
            # interpreter, where that can abort the process (pytorch/pytorch#179291)
            gc.collect()


SINGLE = Ranks()


class _OneProcessDDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel over a world of one process, where none of its exchanges can
    change a bit: rank 0's buffers, broadcast at each forward, are this process's own (that sync
    is off), and the average of the gradients over one process is the gradients. Its forward
    runs under DDP's own `no_sync`, as for the backward passes of gradient accumulation: the
    backward leaves the gradients in the parameters as the model alone does, without DDP's
    reducer (its buckets, hooks, all-reduce), most of DDP's cost a step on a GPU
    (bench/ddp_step.py). DDP's construction, its forward and its state are otherwise unchanged."""

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        with self.no_sync():
            return super().forward(*inputs, **kwargs)


def _forward_buffer_sync() -> str:
    """The name of DDP's switch for rank 0's buffers at each forward: forward_sync_buffers since
    torch 2.13 (where broadcast_buffers, its name before, is deprecated)."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"


def exit_worker(code: int) -> None:
    """End a torchrun worker now that its run folder is final: output flushed, then exit without
    the interpreter's teardown, in which gloo's threads can abort the process
    (pytorch/pytorch#179291) and turn a finished run's exit code into 134."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _machines(world: int) -> tuple[int, int]:
    """The machines of torchrun's processes, and the processes on this one (torchrun's agents,
    one a machine, and their workers)."""
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return int(os.environ.get("GROUP_WORLD_SIZE", world // here)), here


def start(device: str) -> tuple[Ranks, str | None]:
    """Join the other processes when torchrun started this one; else one process alone.
    Returns the ranks and the device this process trains on (None: the configured one)."""
    if not in_worker():
        return SINGLE, None
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise KdlError(
                f"this node runs process {local_rank} but sees {torch.cuda.device_count()} GPU(s): "
                "give --nproc-per-node at most the number of GPUs, or --device cpu"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    control = torch.distributed.new_group(backend="gloo") if cuda else None
    world = torch.distributed.get_world_size()
    ranks = Ranks(torch.distributed.get_rank(), world, local_rank, backend, control, *_machines(world))
    return ranks, f"cuda:{local_rank}" if cuda else "cpu"
