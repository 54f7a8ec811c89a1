"""`kdl plot`: learning curves of several runs on one figure, written as a PNG.

The only module that imports matplotlib, and only when a plot is drawn. It uses the object-oriented
Figure with an Agg canvas rather than pyplot: no display needed, no global backend switched under
a notebook that imports us.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from ..dotted import flatten, is_number, varying_keys
from ..errors import KdlError
from .tables import SERIES_SKIP, metric_series, series_axis, short_id


class Curves(Protocol):
    """What a plot reads of a run (a runfolder.reader.Run): its id, config and metrics records."""

    id: str

    def config_dict(self) -> dict[str, Any]: ...

    def metrics(self) -> list[dict[str, Any]]: ...


def series_names(records: list[dict[str, Any]]) -> list[str]:
    """Every plottable metric in metrics.jsonl records, as split.key (val.loss, train.accuracy)."""
    names: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in SERIES_SKIP and is_number(value):
                names[f"{record.get('split')}.{key}"] = None
    return list(names)


# a colour family per value of the compared key; runs within one get its shades
FAMILIES = ("Blues", "Oranges", "Greens", "Reds", "Purples", "Greys", "YlOrBr", "PuRd")


@dataclass
class LineStyle:
    label: str
    color: tuple[float, float, float, float] | str | None  # None: matplotlib's next colour


def line_styles(found: list[Curves], color_by: str | None = None) -> list[LineStyle]:
    """Legend labels name the config keys that differ between the runs (short ids when none do).
    Runs that share a value of the compared key (`color_by`, else the first differing key other
    than the seed) share a colour family, one shade each."""
    configs = [flatten(run.config_dict()) for run in found]
    keys = varying_keys(configs) if len(found) > 1 else []
    if color_by is not None and color_by not in keys:
        raise KdlError(f"--color-by {color_by}: not a config key that differs between these runs; "
                       f"those are: {', '.join(keys) or 'none'}")
    grouping = color_by or next((k for k in keys if k != "seed"), None)
    keys = sorted(keys, key=lambda k: k != grouping)  # the compared key first in each label
    labels = [", ".join(f"{k}={_shown(c.get(k))}" for k in keys) or short_id(run.id)
              for run, c in zip(found, configs, strict=True)]
    if len(set(labels)) < len(labels) or len(keys) > 4:  # too many keys to read, or runs alike
        labels = [short_id(run.id) + (f" ({label})" if keys and len(keys) <= 4 else "")
                  for run, label in zip(found, labels, strict=True)]
    if grouping is None:
        return [LineStyle(label, None) for label in labels]
    from matplotlib import colormaps

    members: dict[str, list[int]] = {}  # the runs of each value, values in order of appearance
    for index, config in enumerate(configs):
        members.setdefault(_shown(config.get(grouping)), []).append(index)
    colors: list[Any] = [None] * len(found)
    for group, shades in enumerate(members.values()):
        family = colormaps[FAMILIES[group % len(FAMILIES)]]
        for rank, index in enumerate(shades):  # dark to light, never so light it vanishes
            colors[index] = family(0.85 - 0.45 * rank / max(1, len(shades) - 1))
    return [LineStyle(label, color) for label, color in zip(labels, colors, strict=True)]


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def draw(found: list[Curves], metric: str, log_y: bool = False, color_by: str | None = None,
         records: list[list[dict[str, Any]]] | None = None) -> Any:
    """The matplotlib Figure of `metric` (split.key), one line per run; x is the step for the
    per-step `train` split, the epoch for `train_epoch` and `val`. Runs without it are left out.
    `records`: each run's metrics records, when the caller has read them."""
    records = records if records is not None else [run.metrics() for run in found]
    split = metric.partition(".")[0]
    # one x axis for all: steps if any run has points within epochs
    axis = "step" if any(series_axis(r, split) == "step" for r in records) else "epoch"
    series = [metric_series(r, metric, axis) for r in records]
    if not any(ys for _, _, ys in series):
        available = list(dict.fromkeys(name for r in records for name in series_names(r)))
        raise KdlError(f"no metric {metric!r} in these runs; available: {', '.join(available) or 'none yet'}")
    styles = line_styles(found, color_by)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for style, (_, xs, ys) in zip(styles, series, strict=True):
        if ys:
            # markers only where points are few enough to read one by one (epochs, not steps)
            axes.plot(xs, ys, label=style.label, color=style.color,
                      marker="o" if len(xs) <= 30 else None, markersize=3)
    if log_y:
        if any(y <= 0 for _, _, ys in series for y in ys):
            raise KdlError(f"--log-y: {metric} has values <= 0, which a log scale cannot show")
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
    axes.set_xlabel(series[0][0])
    axes.set_ylabel(metric)
    axes.set_title(metric)
    axes.grid(alpha=0.3, which="both" if log_y else "major")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_runs(found: list[Curves], metric: str, log_y: bool = False,
              color_by: str | None = None) -> tuple[bytes, str | None]:
    """The runs' `metric` drawn as a PNG file's bytes; also a note naming the runs left out
    because they have no `metric` (None when every run is drawn)."""
    import io

    records = [run.metrics() for run in found]
    figure = draw(found, metric, log_y, color_by, records)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return png.getvalue(), left_out(found, records, metric)


def left_out(found: list[Curves], records: list[list[dict[str, Any]]], metric: str) -> str | None:
    """Which runs a plot of `metric` cannot draw, and what each has instead."""
    lacking = [(run.id, series_names(rows)) for run, rows in zip(found, records, strict=True)
               if not metric_series(rows, metric)[2]]
    if not lacking:
        return None
    named = "; ".join(f"{run_id} (has {', '.join(names) or 'no metrics yet'})" for run_id, names in lacking)
    return (f"{len(lacking)} of {len(found)} runs have no {metric} and are not drawn: {named}. "
            "Plot them with --metric and one of theirs.")
