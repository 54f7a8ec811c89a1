"""Tables for people: `kdl runs`, `kdl show`, `kdl eval`. Reads run folders, never imports torch."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from . import runs
from .progress import format_metrics


def _console() -> Console:
    """Wide when piped, so a script reading `kdl runs` gets whole ids, never folded cells."""
    import sys

    width = None if sys.stdout.isatty() else 240
    return Console(highlight=False, soft_wrap=False, width=width)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


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
        "duration_s": meta.get("duration_s"),
        "created_at": meta.get("created_at"),
        "path": str(run.path),
    }


def print_runs(rows: list[dict[str, Any]]) -> None:
    console = _console()
    if not rows:
        console.print("no runs yet; start one with `kdl train configs/digits_cnn.yaml`")
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("id", "status", "name", "model", "dataset", "epochs", "best", "duration"):
        table.add_column(column)
    for row in rows:
        best = f"{row['best_metric']} {_number(row['best_value'])}" if row["best_metric"] else "-"
        table.add_row(
            row["id"], row["status"], row["name"] or "-", row["model"] or "-",
            row["dataset"] or "-", f"{row['epochs_done']}/{row['epochs'] or '?'}", best,
            format_duration(row["duration_s"]),
        )
    console.print(table)


ENV_KEYS = ("status", "created_at", "ended_at", "duration_s", "command", "host", "device",
            "config_hash", "git_commit", "python")


def print_show(run: runs.Run) -> None:
    console = _console()
    meta = run.meta
    console.print(f"[bold]{run.id}[/bold]  {run.path}")
    console.print("\n[bold]config[/bold]")
    text = (run.path / runs.CONFIG).read_text() if (run.path / runs.CONFIG).is_file() else ""
    console.print(text.rstrip(), markup=False)
    console.print("\n[bold]environment[/bold]")
    env = {k: meta.get(k) for k in ENV_KEYS} | dict(meta.get("versions") or {})
    env["status"] = run.status
    for key, value in env.items():
        shown = " ".join(value) if isinstance(value, list) else value
        console.print(f"  {key}: {shown}", markup=False)
    console.print("\n[bold]metrics per epoch[/bold]")
    console.print(epoch_table(run.metrics()))
    summary = run.summary()
    if summary:
        best = summary.get("best") or {}
        console.print(f"\nbest {best.get('metric')} = {_number(best.get('value'))} "
                      f"at epoch {best.get('epoch')}", markup=False)


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
    table = Table(show_edge=False, header_style="bold")
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
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        table = Table(show_edge=False, header_style="bold", title="per-class accuracy")
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        for name, value in per_class.items():
            table.add_row(str(name), _number(value))
        console.print(table)
    confusion = metrics.get("confusion_matrix")
    if confusion:
        table = Table(show_edge=False, header_style="bold", title="confusion (rows: true)")
        table.add_column("")
        for index in range(len(confusion)):
            table.add_column(str(index), justify="right")
        names = metrics.get("class_names") or [str(i) for i in range(len(confusion))]
        for index, row in enumerate(confusion):
            table.add_row(f"{index} {names[index]}", *map(str, row))
        console.print(table)
