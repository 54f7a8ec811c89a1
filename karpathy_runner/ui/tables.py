"""Tables and charts for people: `kdl runs`, `kdl show`, `kdl compare`, `kdl eval`, drawn from
plain records. Never imports torch.

rich is imported inside the functions that draw with it, so that `kdl runs` (a plain text table)
starts without it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..dotted import is_number
from .progress import format_duration, format_metrics

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def rich_console() -> Console:
    """Wide when piped, so a script reading the output gets whole ids, never folded cells."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else 240
    console = Console(highlight=False, soft_wrap=False, width=width)
    console.on_broken_pipe = _reader_left  # rich's own exits 1: let the CLI stop as Unix tools do
    return console


def _reader_left() -> None:
    raise BrokenPipeError


def rich_table(**options: Any) -> Table:
    from rich.table import Table

    return Table(show_edge=False, header_style="bold", **options)


def number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def value_cell(value: Any) -> str:
    """A config value as a cell: numbers short, lists and booleans as in YAML/JSON."""
    if isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return number(value)


SERIES_SKIP = {"step", "epoch", "split", "time"}  # bookkeeping fields of a record, not metrics


def metric_series(records: list[dict[str, Any]], name: str,
                  axis: str | None = None) -> tuple[str, list[float], list[float]]:
    """(x label, xs, ys) of one split.key metric: per step for the `train` split and for a val
    with records within epochs (train.eval_every_steps), else per epoch; or per `axis`."""
    split, _, key = name.partition(".")
    axis = axis or series_axis(records, split)
    points = [(r[axis], r[key]) for r in records
              if r.get("split") == split and r.get(axis) is not None and is_number(r.get(key))]
    return axis, [float(x) for x, _ in points], [float(y) for _, y in points]


def series_axis(records: list[dict[str, Any]], split: str) -> str:
    """The x axis a split's curve is drawn against: step or epoch."""
    within = split == "train" or any(r.get("mid_epoch") and r.get("split") == split for r in records)
    return "step" if within else "epoch"


def short_id(run_id: str) -> str:
    """`digits_cnn-a0b645` for `20261130-021835-digits_cnn-a0b645`: what tells runs apart."""
    parts = run_id.split("-", 2)
    stamped = len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit()
    return parts[2] if stamped else run_id


def print_runs(rows: list[dict[str, Any]], extra: str | None = None) -> None:
    if not rows:
        print("no runs match; start one with `kdl train configs/digits_cnn.yaml`")
        return
    headers = ["id", "status", "name", "model", "dataset", "epochs", "best", "duration"]
    cells = []
    for row in rows:
        best = f"{row['best_metric']} {number(row['best_value'])}" if row["best_metric"] else "-"
        cells.append([
            row["id"], row["status"], row["name"] or "-", row["model"] or "-",
            row["dataset"] or "-", f"{row['epochs_done']}/{row['epochs'] or '?'}", best,
            format_duration(row["duration_s"]), *([value_cell(row[extra])] if extra else []),
        ])
    print(text_table([*headers, *([extra] if extra else [])], cells), flush=True)
    for row in rows:
        if row.get("damage"):
            print(f"{row['id']} is damaged: {row['damage']}", file=sys.stderr, flush=True)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded with spaces, like `docker ps`: rich's layout took 0.6 s for 300 runs, this
    takes milliseconds, and `awk '{print $1}'` gets the ids. The header is bold on a terminal."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
             for cells in [headers, *rows]]
    if sys.stdout.isatty():
        lines[0] = f"\033[1m{lines[0]}\033[0m"
    return "\n".join(lines)


def print_csv(rows: list[dict[str, Any]]) -> None:
    """Rows as CSV on stdout, one column per key seen in any row; lists and dicts as JSON."""
    import csv

    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})



def epoch_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch: train_epoch and val records merged as train.* and val.*."""
    rows: dict[int, dict[str, Any]] = {}
    skip = {"step", "epoch", "split", "time"}
    for record in records:
        split = record.get("split")
        if split not in ("train_epoch", "val") or record.get("mid_epoch"):
            continue
        prefix = "train" if split == "train_epoch" else "val"
        row = rows.setdefault(record["epoch"], {"epoch": record["epoch"]})
        row["step"] = record.get("step")
        row.update({f"{prefix}.{k}": v for k, v in record.items() if k not in skip})
        row["time"] = record.get("time")
    return [rows[e] for e in sorted(rows)]


def epoch_table(records: list[dict[str, Any]]) -> Table:
    rows = epoch_rows(records)
    table = rich_table()
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(number(row.get(c)) for c in columns))
    return table


def print_eval(result: dict[str, Any]) -> None:
    console = rich_console()
    metrics = result["metrics"]
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    console.print(
        f"[bold]{result['run']}[/bold]  checkpoint {result['checkpoint']} (epoch {result['epoch']}),"
        f" split {result['split']}, {result['samples']} samples"
    )
    console.print(format_metrics(headline), markup=False)
    if metrics.get("features"):
        console.print(f"samples scored in the feature space of {metrics['features']}", markup=False)
    # every per_class_<measure> map of class name -> value (a classifier's accuracy, a
    # segmentation's IoU) as a table of its own
    for key, per_class in metrics.items():
        if not (key.startswith("per_class_") and isinstance(per_class, dict) and per_class):
            continue
        measure = key.removeprefix("per_class_")
        table = rich_table(title=f"per-class {measure}")
        table.add_column("class")
        table.add_column(measure, justify="right")
        for name, value in per_class.items():
            table.add_row(str(name), number(value))
        console.print(table)
    confusion = metrics.get("confusion_matrix")
    if confusion:
        table = rich_table(title="confusion (rows: true)")
        table.add_column("")
        for index in range(len(confusion)):
            table.add_column(str(index), justify="right")
        names = metrics.get("class_names") or [str(i) for i in range(len(confusion))]
        for index, row in enumerate(confusion):  # digits are named by their index: once, not twice
            label = names[index] if str(names[index]) == str(index) else f"{index} {names[index]}"
            table.add_row(label, *map(str, row))
        console.print(table)


# ----------------------------------------------------------------------------- terminal chart

BLOCKS = " ▁▂▃▄▅▆▇█"  # eighths of a character cell, so a 6-row chart has 48 levels


def chart_rows(values: list[float], height: int = 6, width: int = 60) -> tuple[list[str], float, float]:
    """Bars of `values` in block characters, top row first, and the (low, high) they span: one
    column per value, averaged in buckets when there are more values than `width`, widened when
    there are few."""
    size = math.ceil(len(values) / width)
    points = [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]
    finite = [v for v in points if math.isfinite(v)]
    low, high = min(finite), max(finite)
    steps = height * 8
    # the lowest value keeps one eighth, so every point stays visible; NaN/inf stay blank
    levels = [0 if not math.isfinite(v) else steps // 2 if high == low
              else 1 + round((v - low) / (high - low) * (steps - 1)) for v in points]
    repeat = max(1, min(8, width // len(points)))
    rows = ["".join(BLOCKS[min(8, max(0, level - row * 8))] * repeat for level in levels)
            for row in range(height - 1, -1, -1)]
    return rows, low, high


def metric_chart(records: list[dict[str, Any]], metric: str, height: int = 6, width: int = 60) -> list[str]:
    """A run's curve of one split.key metric as text: the y range on the left, the x range below."""
    axis, xs, ys = metric_series(records, metric)
    if not any(math.isfinite(y) for y in ys):
        return [f"no {metric} values yet"]
    bars, low, high = chart_rows(ys, height, width)
    top, bottom = ("", number(low)) if low == high else (number(high), number(low))
    pad = max(len(top), len(bottom))
    labels = [top, *[""] * (height - 2), bottom]
    lines = [f"{label:>{pad}} {'┤' if label else '│'}{bar}" for label, bar in zip(labels, bars, strict=True)]
    lines.append(f"{'':>{pad}} └{'─' * len(bars[0])}")
    first, last = f"{axis} {xs[0]:g}", f"{xs[-1]:g}" if len(xs) > 1 else ""
    lines.append(f"{'':>{pad}}  {first}{last.rjust(max(len(last) + 1, len(bars[0]) - len(first)))}")
    return [line.rstrip() for line in lines]


# ----------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    """The table `kdl compare` prints: one row per run, or per group with --group-by."""

    keys: list[str]  # config columns: the keys that differ, or the --group-by keys
    metrics: list[str]  # final metrics, then "best" (each run's value of best_metric)
    best_metric: str | None
    best_mode: str | None  # None: no run declares which way its best metric is better
    rows: list[dict[str, Any]]
    best_row: int | None  # the row with the best "best" (or best mean of it)
    group_by: list[str] = field(default_factory=list)
    averaged_over: list[str] = field(default_factory=list)  # the other differing keys (seeds)
    tasks: dict[str, int] = field(default_factory=dict)  # runs per task: several, no row is best


def print_comparison(comparison: Comparison) -> None:
    """Config keys that differ and the metrics; the best row (by the best metric's mode) in green.
    On a terminal too narrow for the table, ids lose their date-time start (the name and the
    random suffix stay) and headers break at their dots, so nothing is cut to an ellipsis."""
    console = rich_console()
    table = _comparison_table(comparison, narrow=False)
    narrow = console.measure(table, options=console.options.update_width(10_000)).maximum > console.width
    if narrow:
        table = _comparison_table(comparison, narrow=True)
    console.print(table)
    console.print(_comparison_note(comparison), markup=False)
    if narrow and not comparison.group_by:
        console.print("ids without their date-time start; `kdl compare --json` has them whole",
                      markup=False)


def _comparison_table(comparison: Comparison, narrow: bool) -> Table:
    from rich import box

    grouped = bool(comparison.group_by)
    table = (rich_table(box=None, padding=(0, 1), collapse_padding=True, pad_edge=False) if narrow
             else rich_table(box=box.HEAVY_HEAD))
    show_status = not grouped and any(row["status"] != "completed" for row in comparison.rows)
    # a sweep's points it did not make: the runs it reused or resumed
    show_how = not grouped and any(row.get("how") not in (None, "made") for row in comparison.rows)
    # a search's trials: their numbers, and with halving the rung and epochs where each stopped
    places = [] if grouped else [key for key in ("trial", "rung", "epochs")
                                 if any(key in row["trial"] for row in comparison.rows)]
    first = [*comparison.keys, "n"] if grouped else ["id", *(["status"] if show_status else []),
                                                      *(["how"] if show_how else []),
                                                      *places, *comparison.keys]
    # narrow: the note under the table names the best metric
    best_header = f"best {comparison.best_metric}" if comparison.best_metric and not narrow else "best"
    metrics = [best_header if metric == "best" else metric for metric in comparison.metrics]
    for index, column in enumerate(["", *first, *metrics]):
        header = column.replace(".", ".\n").replace(" ", "\n") if narrow else column
        table.add_column(header, no_wrap=True, justify="right" if index > len(first) else "left")
    for index, row in enumerate(comparison.rows):
        marker = "*" if index == comparison.best_row else ""
        if grouped:
            cells = [*(value_cell(row["values"][k]) for k in comparison.keys), str(row["n"]),
                     *(_stat_cell(row["metrics"][m], row["n"]) for m in comparison.metrics)]
        else:
            shown_id = short_id(row["id"]) if narrow else row["id"]
            cells = [shown_id, *([row["status"]] if show_status else []),
                     *([row["how"]] if show_how else []),
                     *(str(row["trial"].get(k, "-")) for k in places),
                     *(value_cell(row["config"][k]) for k in comparison.keys),
                     *(number(row["metrics"][m]) for m in comparison.metrics)]
        table.add_row(marker, *cells, style="bold green" if marker else None)
    return table


def _stat_cell(stats: dict[str, Any], group_size: int) -> str:
    if stats["n"] == 0:
        return "-"
    cell = f"{number(stats['mean'])} ± {number(stats['std'])}"
    return cell if stats["n"] == group_size else f"{cell} (n={stats['n']})"


def _comparison_note(comparison: Comparison) -> str:
    if len(comparison.tasks) > 1:
        counted = ", ".join(f"{n} {task}" for task, n in comparison.tasks.items())
        return (f"no row marked: these runs are of different tasks ({counted}), whose metrics "
                f"measure different things ({comparison.best_metric} of one is not comparable with "
                "another's); compare the runs of one task to see which is best")
    if comparison.best_mode is None:
        return f"no row marked: these runs do not declare which way {comparison.best_metric} is better"
    direction = "lowest" if comparison.best_mode == "min" else "highest"
    note = f"* {direction} best {comparison.best_metric}"
    if comparison.group_by:
        over = ", ".join(comparison.averaged_over) or "runs with the same config"
        note += f" (group mean); mean ± sample std (n-1) over {over}"
    return note
