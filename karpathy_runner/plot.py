"""`kdl plot`: learning curves of several runs on one figure, written as a PNG.

The only module that imports matplotlib, and only when a plot is drawn. It uses the object-oriented
Figure with an Agg canvas rather than pyplot: no display needed, no global backend switched under
a notebook that imports us.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import runs
from .compare import is_number, varying_keys
from .dotted import flatten
from .errors import KdlError

SERIES_SKIP = {"step", "epoch", "split", "time"}  # bookkeeping fields of a record, not metrics


def series_names(records: list[dict[str, Any]]) -> list[str]:
    """Every plottable metric in metrics.jsonl records, as split.key (val.loss, train.accuracy)."""
    names: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in SERIES_SKIP and is_number(value):
                names[f"{record.get('split')}.{key}"] = None
    return list(names)


def metric_series(records: list[dict[str, Any]], name: str) -> tuple[str, list[float], list[float]]:
    """(x label, xs, ys) of one split.key metric: per step for the `train` split, else per epoch."""
    split, _, key = name.partition(".")
    axis = "step" if split == "train" else "epoch"
    points = [(r[axis], r[key]) for r in records
              if r.get("split") == split and r.get(axis) is not None and is_number(r.get(key))]
    return axis, [float(x) for x, _ in points], [float(y) for _, y in points]


def run_labels(found: list[runs.Run], most_keys: int = 3) -> list[str]:
    """Run ids, plus the config keys that differ between the runs when there are only a few."""
    configs = [flatten(run.config_dict()) for run in found]
    keys = varying_keys(configs) if len(found) > 1 else []
    if not keys or len(keys) > most_keys:
        return [run.id for run in found]
    return [f"{run.id} ({', '.join(f'{k}={config.get(k)}' for k in keys)})"
            for run, config in zip(found, configs, strict=True)]


def plot_runs(found: list[runs.Run], metric: str, out: Path) -> Path:
    """Draw `metric` (split.key) of each run as one line; x is the step for the per-step `train`
    split, the epoch for `train_epoch` and `val`. Runs without the metric are left out."""
    records = [run.metrics() for run in found]
    series = [metric_series(r, metric) for r in records]
    if not any(ys for _, _, ys in series):
        available = list(dict.fromkeys(name for r in records for name in series_names(r)))
        raise KdlError(f"no metric {metric!r} in these runs; available: {', '.join(available) or 'none yet'}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (_, xs, ys) in zip(run_labels(found), series, strict=True):
        if ys:
            # markers only where points are few enough to read one by one (epochs, not steps)
            axes.plot(xs, ys, label=label, marker="o" if len(xs) <= 30 else None, markersize=3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
    axes.set_xlabel(series[0][0])
    axes.set_ylabel(metric)
    axes.set_title(metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out
