"""Tables for people: `kdl runs`, `kdl show`, `kdl compare`, `kdl eval`. Never imports torch.

rich is imported inside the functions that draw with it, so that `kdl runs` (a plain text table)
starts without it.
"""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

from . import runs
from .compare import best_metric_name, sweep_id
from .dotted import MISSING
from .plot import metric_series
from .progress import format_duration, format_metrics

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .compare import Comparison, Ordering


def _console() -> Console:
    """Wide when piped, so a script reading the output gets whole ids, never folded cells."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else 240
    console = Console(highlight=False, soft_wrap=False, width=width)
    console.on_broken_pipe = _reader_left  # rich's own exits 1: let the CLI stop as Unix tools do
    return console


def _reader_left() -> None:
    raise BrokenPipeError


def _table(**options: Any) -> Table:
    from rich.table import Table

    return Table(show_edge=False, header_style="bold", **options)


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _value(value: Any) -> str:
    """A config value as a cell: numbers short, lists and booleans as in YAML/JSON."""
    if isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return _number(value)


def run_row(run: runs.Run) -> dict[str, Any]:
    """One run as a flat record (the `kdl runs --json` schema)."""
    meta = run.meta
    best = meta.get("best") or {}
    return {
        "id": run.id,
        "status": run.status,
        "name": meta.get("name"),
        "model": meta.get("model"),
        "dataset": meta.get("dataset"),
        "epochs_done": meta.get("epochs_done", 0),
        "epochs": meta.get("epochs"),
        "best_metric": best.get("metric"),
        "best_value": best.get("value"),
        "duration_s": run.duration(),
        "created_at": meta.get("created_at"),
        "sweep": sweep_id(run),
        "path": str(run.path),
        "damage": run.damage,
    }


def ordering_rows(ordering: Ordering) -> tuple[list[dict[str, Any]], str | None]:
    """`kdl runs` rows, plus the sort key as an extra column when it is not one already."""
    from .compare import COLUMNS

    extra = ordering.key if ordering.key and ordering.key not in COLUMNS else None
    rows = [run_row(run) for run in ordering.runs]
    if extra:
        for row in rows:
            value = ordering.values.get(row["id"])
            row[extra] = None if value is MISSING else value
    return rows, extra


def print_runs(rows: list[dict[str, Any]], extra: str | None = None) -> None:
    if not rows:
        print("no runs match; start one with `kdl train configs/digits_cnn.yaml`")
        return
    headers = ["id", "status", "name", "model", "dataset", "epochs", "best", "duration"]
    cells = []
    for row in rows:
        best = f"{row['best_metric']} {_number(row['best_value'])}" if row["best_metric"] else "-"
        cells.append([
            row["id"], row["status"], row["name"] or "-", row["model"] or "-",
            row["dataset"] or "-", f"{row['epochs_done']}/{row['epochs'] or '?'}", best,
            format_duration(row["duration_s"]), *([_value(row[extra])] if extra else []),
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


ENV_KEYS = ("status", "created_at", "ended_at", "duration_s", "command", "host", "device",
            "config_hash", "git_commit", "python")


def print_show(run: runs.Run) -> None:
    console = _console()
    meta = run.meta
    console.print(f"[bold]{run.id}[/bold]  {run.path}")
    console.print("\n[bold]config[/bold]")
    config = run.path / runs.CONFIG
    text = config.read_bytes().decode("utf-8", errors="replace") if config.is_file() else ""
    console.print(text.rstrip(), markup=False)
    console.print("\n[bold]environment[/bold]")
    env = {k: meta.get(k) for k in ENV_KEYS} | dict(meta.get("versions") or {})
    env["status"] = run.status
    for key, value in env.items():
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        console.print(f"  {key}: {shown}", markup=False)
    records = run.metrics()
    console.print("\n[bold]metrics per epoch[/bold]")
    console.print(epoch_table(records))
    metric = best_metric_name(run)
    console.print(f"\n[bold]{metric}[/bold]")
    console.print("\n".join(metric_chart(records, metric)), markup=False)
    summary = run.summary()
    if summary:
        best = summary.get("best") or {}
        if best.get("metric"):
            console.print(f"\nbest {best['metric']} = {_number(best.get('value'))} "
                          f"at epoch {best.get('epoch')}", markup=False)
        else:  # a GAN's: no metric of training tells which epoch was best
            console.print(f"\nno best metric: best.pt is the latest epoch's ({best.get('epoch')})",
                          markup=False)
        for split, result in (summary.get("eval") or {}).items():
            console.print(f"eval {split} ({result.get('checkpoint')}.pt, epoch {result.get('epoch')}): "
                          f"{format_metrics(result.get('metrics') or {})}", markup=False)
    run.config_dict()  # its problems too
    if run.damage:
        console.print(f"\ndamaged: {run.damage}", markup=False)


def epoch_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch: train_epoch and val records merged as train.* and val.*."""
    rows: dict[int, dict[str, Any]] = {}
    skip = {"step", "epoch", "split", "time"}
    for record in records:
        split = record.get("split")
        if split not in ("train_epoch", "val"):
            continue
        prefix = "train" if split == "train_epoch" else "val"
        row = rows.setdefault(record["epoch"], {"epoch": record["epoch"]})
        row["step"] = record.get("step")
        row.update({f"{prefix}.{k}": v for k, v in record.items() if k not in skip})
        row["time"] = record.get("time")
    return [rows[e] for e in sorted(rows)]


def epoch_table(records: list[dict[str, Any]]) -> Table:
    rows = epoch_rows(records)
    table = _table()
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_number(row.get(c)) for c in columns))
    return table


def print_eval(result: dict[str, Any]) -> None:
    console = _console()
    metrics = result["metrics"]
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    console.print(
        f"[bold]{result['run']}[/bold]  checkpoint {result['checkpoint']} (epoch {result['epoch']}),"
        f" split {result['split']}, {result['samples']} samples"
    )
    console.print(format_metrics(headline), markup=False)
    if metrics.get("features"):
        console.print(f"samples scored in the feature space of {metrics['features']}", markup=False)
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        table = _table(title="per-class accuracy")
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        for name, value in per_class.items():
            table.add_row(str(name), _number(value))
        console.print(table)
    confusion = metrics.get("confusion_matrix")
    if confusion:
        table = _table(title="confusion (rows: true)")
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
    top, bottom = ("", _number(low)) if low == high else (_number(high), _number(low))
    pad = max(len(top), len(bottom))
    labels = [top, *[""] * (height - 2), bottom]
    lines = [f"{label:>{pad}} {'┤' if label else '│'}{bar}" for label, bar in zip(labels, bars, strict=True)]
    lines.append(f"{'':>{pad}} └{'─' * len(bars[0])}")
    first, last = f"{axis} {xs[0]:g}", f"{xs[-1]:g}" if len(xs) > 1 else ""
    lines.append(f"{'':>{pad}}  {first}{last.rjust(max(len(last) + 1, len(bars[0]) - len(first)))}")
    return [line.rstrip() for line in lines]


# ----------------------------------------------------------------------------- compare


def print_comparison(comparison: Comparison) -> None:
    """Config keys that differ and the metrics; the best row (by the best metric's mode) in green.
    On a terminal too narrow for the table, ids lose their date-time start (the name and the
    random suffix stay) and headers break at their dots, so nothing is cut to an ellipsis."""
    console = _console()
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
    table = (_table(box=None, padding=(0, 1), collapse_padding=True, pad_edge=False) if narrow
             else _table(box=box.HEAVY_HEAD))
    show_status = not grouped and any(row["status"] != "completed" for row in comparison.rows)
    # a search's trials: their numbers, and with halving the rung and epochs where each stopped
    places = [] if grouped else [key for key in ("trial", "rung", "epochs")
                                 if any(key in row["trial"] for row in comparison.rows)]
    first = [*comparison.keys, "n"] if grouped else ["id", *(["status"] if show_status else []),
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
            cells = [*(_value(row["values"][k]) for k in comparison.keys), str(row["n"]),
                     *(_stat_cell(row["metrics"][m], row["n"]) for m in comparison.metrics)]
        else:
            shown_id = runs.short_id(row["id"]) if narrow else row["id"]
            cells = [shown_id, *([row["status"]] if show_status else []),
                     *(str(row["trial"].get(k, "-")) for k in places),
                     *(_value(row["config"][k]) for k in comparison.keys),
                     *(_number(row["metrics"][m]) for m in comparison.metrics)]
        table.add_row(marker, *cells, style="bold green" if marker else None)
    return table


def _stat_cell(stats: dict[str, Any], group_size: int) -> str:
    if stats["n"] == 0:
        return "-"
    cell = f"{_number(stats['mean'])} ± {_number(stats['std'])}"
    return cell if stats["n"] == group_size else f"{cell} (n={stats['n']})"


def _comparison_note(comparison: Comparison) -> str:
    if comparison.best_mode is None:
        return f"no row marked: these runs do not declare which way {comparison.best_metric} is better"
    direction = "lowest" if comparison.best_mode == "min" else "highest"
    note = f"* {direction} best {comparison.best_metric}"
    if comparison.group_by:
        over = ", ".join(comparison.averaged_over) or "runs with the same config"
        note += f" (group mean); mean ± sample std (n-1) over {over}"
    return note
