"""What one training step costs through DistributedDataParallel over a group of one process,
per DDP setting, against the bare model: a hand-written loop (resident data, a permutation per
epoch, slices, autocast), one process, nccl on CUDA (gloo on the CPU), the variants alternating
in rounds so that the machine's drift cancels. bench/ddp.py measures the same through whole
`kdl train` runs; this one says where a difference comes from.

Variants: plain (the model itself); ddp (torch's defaults); ddp_view (gradient_as_bucket_view:
the gradients are views into DDP's buckets, no copies in and out); ddp_view_static (and
static_graph); ddp_view_nobuf (and no buffer broadcast at each forward); ddp_hook (and a
communication hook that keeps a bucket as it is instead of an all-reduce over one process, kdl's
wrapper before); kdl (Ranks.wrap over one process, what `--nproc-per-node 1` trains through: no
buffer broadcast, and its forward under DDP's no_sync, so the reducer has nothing to do).
Cases: digits_cnn_64 (configs/digits_cnn.yaml, fp32: scikit-learn's digits, steps short enough
that DDP's fixed cost shows on a CPU), seed_cnn_64 (configs/cifar_cnn.yaml, fp32), seed_cnn_512
(bf16), speedrun (configs/cifar_speedrun.yaml, batch 1024, bf16), the CIFAR ones on synthetic
CIFAR-10 in the real file format.

    python bench/ddp_step.py [--device cuda] [--steps 300] [--rounds 3] [--cases ...] [--out F]

With --no-group (variant plain only) the process starts no process group: against a run with
one, what a group of one process (nccl's threads, its communicator) costs a plain step.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from synthetic_cifar import use_synthetic_cifar

from karpathy_runner.build import build_experiment
from karpathy_runner.config.loading import load_config
from karpathy_runner.distributed import Ranks, _forward_buffer_sync
from karpathy_runner.models import build_model
from karpathy_runner.optim import build_optimizer
from karpathy_runner.updater import PRECISIONS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CASES = {
    "digits_cnn_64": ("digits_cnn.yaml", ["data.batch_size=64", "train.precision=fp32"]),
    "seed_cnn_64": ("cifar_cnn.yaml", ["data.batch_size=64", "train.precision=fp32"]),
    "seed_cnn_512": ("cifar_cnn.yaml", ["data.batch_size=512", "train.precision=bf16"]),
    "speedrun": ("cifar_speedrun.yaml", ["data.batch_size=1024", "train.precision=bf16"]),
}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "ddp": {},
    "ddp_view": {"gradient_as_bucket_view": True},
    "ddp_view_static": {"gradient_as_bucket_view": True, "static_graph": True},
    "ddp_view_nobuf": {"gradient_as_bucket_view": True, _forward_buffer_sync(): False},
    "ddp_hook": {"gradient_as_bucket_view": True, _forward_buffer_sync(): False},  # + _own_bucket
    "kdl": {},  # Ranks.wrap over one process: kdl's own wrapper, whatever it is
}


def _own_bucket(state, bucket):  # type: ignore[no-untyped-def]  # DDP refuses other annotations
    """A communication hook for a world of one process: a bucket's average is itself."""
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def steps_per_second(exp: Any, variant: str, steps: int) -> float:
    cfg, info, device = exp.cfg, exp.data.info, exp.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    options = VARIANTS[variant]
    if variant == "kdl":
        forward = Ranks(0, 1, 0, torch.distributed.get_backend()).wrap(model)
    elif options is None:
        forward = model
    else:
        forward = torch.nn.parallel.DistributedDataParallel(model, **options)
        if variant == "ddp_hook":
            forward.register_comm_hook(None, _own_bucket)
    dtype = PRECISIONS[cfg.train.precision]
    images = exp.data.train.images.to(device).float() / 255
    labels = exp.data.train.labels.to(device)
    done, started = 0, 0.0
    while done < steps + 30:
        for index in torch.randperm(len(labels), device=device).split(cfg.data.batch_size):
            if done == 30:  # warm-up over: cuDNN's choices made, DDP's buckets rebuilt
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(forward(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps + 30:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--per-batch", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("ddp_step.json"))
    parser.add_argument("--no-group", action="store_true", help="no process group (variant plain only)")
    args = parser.parse_args()
    if args.no_group and args.variants != "plain":
        parser.error("--no-group measures the variant plain alone: add --variants plain")
    root = use_synthetic_cifar(Path(tempfile.gettempdir()) / "kdl-bench-cifar", args.per_batch)
    if not args.no_group:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                             world_size=1)
        # the communicator, made at the first collective, as DDP's construction does
        torch.distributed.broadcast(torch.zeros(1, device=args.device), src=0)
    report: dict[str, Any] = {}
    for case in args.cases.split(","):
        config, overrides = CASES[case]
        exp = build_experiment(load_config(CONFIGS / config, [
            *overrides, f"data.root={root}", "data.download=false", "data.val_fraction=0",
            "train.best_metric=null", f"train.device={args.device}"]))
        rates: dict[str, list[float]] = {variant: [] for variant in args.variants.split(",")}
        for round_ in range(args.rounds):
            order = list(rates) if round_ % 2 == 0 else list(reversed(rates))
            for variant in order:
                rates[variant].append(steps_per_second(exp, variant, args.steps))
        plain = statistics.median(rates["plain"])
        report[case] = {variant: {"steps_per_s": [round(r, 1) for r in each],
                                  "ms_per_step": round(1000 / statistics.median(each), 3),
                                  "over_plain": round(statistics.median(each) / plain, 4)}
                        for variant, each in rates.items()}
        for variant, row in report[case].items():
            print(f"{case:13} {variant:16} {row['ms_per_step']:8.3f} ms/step  x{row['over_plain']:.4f} "
                  f"of plain  {row['steps_per_s']}", flush=True)
    if not args.no_group:
        torch.distributed.destroy_process_group()
    summary = {"device": args.device, "steps": args.steps, "group": not args.no_group, "cases": report}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
