"""Run folders written by hand in the exact on-disk format, with known numbers, so that tests of the
read-side commands (runs, show, compare, plot, rm) need no training."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from karpathy_runner.runfolder import layout

BASE_CONFIG: dict[str, Any] = {
    "name": "digits_cnn",
    "seed": 0,
    "data": {"name": "digits", "batch_size": 32, "val_fraction": 0.1},
    "model": {"name": "cnn", "channels": [32, 64], "dropout": 0.1},
    "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0005},
    "scheduler": {"name": "onecycle"},
    "train": {"epochs": 3, "device": "auto", "best_metric": "val.loss", "best_mode": "auto"},
}
STEPS_PER_EPOCH = 10


def make_run(
    root: Path,
    val_loss: Sequence[float] = (0.5, 0.3, 0.2),
    *,
    name: str = "digits_cnn",
    config: dict[str, Any] | None = None,
    status: str = "completed",
    sweep: str | None = None,
    pid: int | None = None,
    metric_modes: dict[str, str] | None = None,
    task: str = "classify",
) -> Path:
    """One run folder under `root`. `val_loss` is the per-epoch curve; val.accuracy is 1 - loss/2 and
    train.loss is loss + 0.1, so every final and best value follows from it. `config` holds dotted
    overrides (optimizer.lr=0.1). `metric_modes` is what the run's task declares (default: the
    classify task's: loss min, accuracy max). A 'running' run points at this (alive) test process unless `pid`
    says otherwise. Folders sort in creation order, like real run ids."""
    root.mkdir(parents=True, exist_ok=True)
    index = len(list(root.iterdir()))
    run_id = f"20260101-{index:06d}-{name}-{index:06x}"
    folder = root / run_id
    (folder / layout.CHECKPOINTS).mkdir(parents=True)
    cfg = _config(name, config or {})
    epochs = [_epoch_metrics(loss) for loss in val_loss]
    (folder / layout.CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / layout.METRICS).write_text("".join(json.dumps(r) + "\n" for r in _records(epochs)))
    best_epoch = min(range(len(val_loss)), key=val_loss.__getitem__) + 1 if val_loss else None
    best = {"metric": "val.loss", "value": val_loss[best_epoch - 1] if best_epoch else None,
            "epoch": best_epoch}
    meta = _meta(run_id, cfg, status, index, len(val_loss), best, pid)
    meta["metric_modes"] = metric_modes or {"loss": "min", "accuracy": "max"}
    meta["task"] = task
    if sweep:
        meta["sweep"] = {"id": sweep, "point": {"optimizer.lr": cfg["optimizer"]["lr"]}}
    (folder / layout.META).write_text(json.dumps(meta, indent=2))
    if status != "running":
        summary = {"status": status, "epochs_done": len(val_loss), "final": epochs[-1] if epochs else {},
                   "best": {**best, "mode": "min"}, "duration_s": meta["duration_s"]}
        (folder / layout.SUMMARY).write_text(json.dumps(summary, indent=2))
    return folder


def _config(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["name"] = name
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def _epoch_metrics(val_loss: float) -> dict[str, float]:
    return {"train.loss": val_loss + 0.1, "train.accuracy": 1 - val_loss / 2 - 0.05,
            "val.loss": val_loss, "val.accuracy": 1 - val_loss / 2}


def _records(epochs: list[dict[str, float]]) -> list[dict[str, Any]]:
    records = []
    for epoch, metrics in enumerate(epochs, start=1):
        step = epoch * STEPS_PER_EPOCH
        train = {"loss": metrics["train.loss"], "accuracy": metrics["train.accuracy"]}
        records += [
            {"step": step, "epoch": epoch, "split": "train", **train, "lr": 0.003,
             "samples_per_s": 4000.0, "time": epoch * 0.5},
            {"step": step, "epoch": epoch, "split": "train_epoch", **train, "time": epoch * 0.5},
            {"step": step, "epoch": epoch, "split": "val", "loss": metrics["val.loss"],
             "accuracy": metrics["val.accuracy"], "time": epoch * 0.5 + 0.01},
        ]
    return records


def _meta(run_id: str, cfg: dict[str, Any], status: str, index: int, epochs_done: int,
          best: dict[str, Any], pid: int | None) -> dict[str, Any]:
    created = f"2026-01-01T12:{index // 60:02d}:{index % 60:02d}+00:00"
    running = status == "running"
    return {
        "id": run_id, "name": cfg["name"], "status": status, "created_at": created,
        "started_at": created, "ended_at": None if running else created,
        "duration_s": None if running else 10.0 + index, "task": "classify",
        "model": cfg["model"]["name"], "dataset": cfg["data"]["name"],
        "config_hash": f"{index:016x}", "device": "cpu", "epochs": cfg["train"]["epochs"],
        "epochs_done": epochs_done, "step": epochs_done * STEPS_PER_EPOCH,
        "command": ["kdl", "train", "configs/digits_cnn.yaml"], "host": socket.gethostname(),
        "pid": os.getpid() if pid is None else pid,
        "pid_started": layout.process_start_time(os.getpid()) if pid is None else None,
        "python": "3.11.7", "best": best, "error": None,
    }
