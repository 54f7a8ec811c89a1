"""Reading many runs at once: select them (filters), order them, compare them, average over seeds.

`compare` and `group_stats` are pure functions on plain dicts (one record per run), so they are
tested on known numbers without training. Only JSON and YAML files are read here: no torch and no
pydantic, so `kdl runs` and `kdl compare` start fast. config.yaml and summary.json are opened only
when a filter, a sort key or a comparison needs them.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dotted import MISSING, dotted_get, flatten, hashable, is_number, varying_keys
from ..errors import KdlError, quoted
from ..runfolder import layout, sweeps
from ..runfolder.reader import (
    Run,
    best_mode,
    current_best,
    final_metrics,
    iter_runs,
    metric_mode,
    sweep_id,
    trial_place,
)
from ..ui.tables import Comparison

# `kdl runs` columns that --sort accepts, and where each one's value lives
COLUMNS = {
    "id": lambda run: run.id,
    "name": lambda run: run.meta.get("name"),
    "status": lambda run: run.status,
    "model": lambda run: run.meta.get("model"),
    "dataset": lambda run: run.meta.get("dataset"),
    "epochs": lambda run: run.meta.get("epochs_done"),
    "duration": lambda run: run.duration(),
    "created": lambda run: run.meta.get("created_at"),
}


class Fields:
    """Values of runs by dotted name, reading each config.yaml and summary.json at most once."""

    def __init__(self) -> None:
        self._configs: dict[str, dict[str, Any]] = {}
        self._summaries: dict[str, dict[str, Any]] = {}

    def config(self, run: Run) -> dict[str, Any]:
        if run.id not in self._configs:
            self._configs[run.id] = flatten(run.config_dict())
        return self._configs[run.id]

    def final(self, run: Run) -> dict[str, Any]:
        if run.id not in self._summaries:
            self._summaries[run.id] = run.summary()
        return final_metrics(self._summaries[run.id])

    def field(self, run: Run, key: str) -> Any:
        """A meta key (status as `Run.status` reports it, so 'crashed' works), else a config key."""
        if key == "status":
            return run.status
        found = dotted_get(run.meta, key)
        return found if found is not MISSING else self.config(run).get(key, MISSING)

    def known_keys(self, run: Run) -> list[str]:
        return [*flatten(run.meta), *self.config(run)]


# ----------------------------------------------------------------------------- selecting


@dataclass
class Condition:
    """One --where key=value; the value is read as YAML, so 0.1, true and [32, 64] have their types."""

    key: str
    value: Any
    text: str
    seen: bool = False  # did any run have the key? If none did, it is probably a typo

    def matches(self, actual: Any) -> bool:
        if actual is MISSING:
            return False
        self.seen = True
        if isinstance(actual, float) and isinstance(self.value, (int, float)):
            return math.isclose(actual, self.value, rel_tol=1e-9)
        return actual == self.value or str(actual) == self.text


def parse_where(items: list[str]) -> list[Condition]:
    if not items:
        return []  # and no yaml import: it costs 30 ms of a plain `kdl runs`
    from ..config import safe_yaml

    conditions = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise KdlError(f"--where takes key=value, like optimizer.lr=0.1; got {quoted(item)}")
        try:  # within the bounds of YAML in a config file
            value = safe_yaml.parse(text)
        except safe_yaml.TooLarge as exc:
            raise KdlError(f"--where {key.strip()}: the value {exc}") from None
        except safe_yaml.UnsafeYaml:
            value = text
        conditions.append(Condition(key.strip(), value, text))
    return conditions


def select_runs(
    candidates: list[Run],
    fields: Fields,
    statuses: list[str] | None = None,
    name: str | None = None,
    sweep: dict[str, str] | None = None,
    where: list[str] | None = None,
) -> list[Run]:
    """The runs that pass every filter; cheap meta filters first, config.yaml only for --where.
    `sweep`: the points of a sweep (sweep_points), run id -> how the sweep has them."""
    unknown = sorted(set(statuses or []) - set(layout.STATUSES))
    if unknown:
        raise KdlError(f"unknown status {', '.join(unknown)}; choose from {', '.join(layout.STATUSES)}")
    conditions = parse_where(where or [])
    chosen = []
    for run in candidates:
        if statuses and run.status not in statuses:
            continue
        if name and not fnmatch.fnmatchcase(run.meta.get("name") or "", name):
            continue
        if sweep is not None and run.id not in sweep:
            continue
        # no short-circuit: every condition must see every run, to tell a typo from no match
        if all([cond.matches(fields.field(run, cond.key)) for cond in conditions]):
            chosen.append(run)
    _check_seen(conditions, candidates, fields)
    return chosen


def _check_seen(conditions: list[Condition], candidates: list[Run], fields: Fields) -> None:
    import difflib

    for cond in conditions:
        if cond.seen or not candidates:
            continue
        close = difflib.get_close_matches(cond.key, fields.known_keys(candidates[0]), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise KdlError(f"--where {cond.key}: no run has this key (in meta.json or config.yaml){hint}")


# ----------------------------------------------------------------------------- ordering


@dataclass
class Ordering:
    """The result of --sort: runs in order, and each run's value of the sort key (for a column)."""

    runs: list[Run]
    key: str | None = None
    values: dict[str, Any] = field(default_factory=dict)


def sort_runs(items: list[Run], spec: str, fields: Fields) -> Ordering:
    """Best first for metrics (descending for accuracy, ascending for losses), ascending otherwise;
    a leading '-' reverses that. Runs without a value come last either way."""
    key = spec.lstrip("-")
    is_metric = key == "best" or any(key in fields.final(run) for run in items)
    values = {run.id: _sort_value(run, key, fields) for run in items}
    if items and all(_absent(v) for v in values.values()):
        raise KdlError(f"--sort {key}: no run has it. Sort by a column ({', '.join(COLUMNS)}), 'best', "
                       f"a final metric ({', '.join(_final_names(items, fields)) or 'none yet'}) "
                       "or a config key like optimizer.lr")
    descending = is_metric and _declared_mode(key, items) == "max"
    if spec.startswith("-"):
        descending = not descending
    present = [run for run in items if not _absent(values[run.id])]
    present.sort(key=lambda run: _sortable(values[run.id]), reverse=descending)
    return Ordering(present + [run for run in items if _absent(values[run.id])], key, values)


def _sort_value(run: Run, key: str, fields: Fields) -> Any:
    if key in COLUMNS:
        return COLUMNS[key](run)
    if key == "best":
        return (run.meta.get("best") or {}).get("value", MISSING)
    final = fields.final(run)
    return final[key] if key in final else fields.field(run, key)


def _declared_mode(key: str, items: list[Run]) -> str | None:
    """The direction the runs declare for a metric ('best': for their best metric)."""
    modes = (best_mode(run) if key == "best" else metric_mode(run, key) for run in items)
    return next((mode for mode in modes if mode is not None), None)


def _final_names(items: list[Run], fields: Fields) -> list[str]:
    return list(dict.fromkeys(name for run in items[:20] for name in fields.final(run)))


def _absent(value: Any) -> bool:
    return value is MISSING or value is None or (isinstance(value, float) and math.isnan(value))


def _sortable(value: Any) -> tuple[int, Any]:
    """Numbers before text, so a column mixing both still sorts instead of raising."""
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value))


def query_runs(
    root: Path,
    statuses: list[str] | None = None,
    name: str | None = None,
    sweep: str | None = None,
    where: list[str] | None = None,
    sort: str | None = None,
    limit: int | None = None,
) -> Ordering:
    """`kdl runs`: filter, sort, then keep the top `limit` (sorted) or the newest `limit` (unsorted)."""
    fields, candidates = Fields(), list(iter_runs(root))
    points = sweep_points(root, sweep, candidates) if sweep else None
    chosen = select_runs(candidates, fields, statuses, name, points, where)
    ordering = sort_runs(chosen, sort, fields) if sort else Ordering(chosen)
    if limit is not None:
        # unsorted runs are oldest first, so the ones worth keeping are at the end
        start = 0 if sort else max(0, len(ordering.runs) - limit)
        ordering.runs = ordering.runs[start:start + limit]
    return ordering


def run_row(run: Run) -> dict[str, Any]:
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
    extra = ordering.key if ordering.key and ordering.key not in COLUMNS else None
    rows = [run_row(run) for run in ordering.runs]
    if extra:
        for row in rows:
            value = ordering.values.get(row["id"])
            row[extra] = None if value is MISSING else value
    return rows, extra


# ----------------------------------------------------------------------------- comparing


def sweep_points(root: Path, sweep: str, candidates: list[Run]) -> dict[str, str]:
    """The points of a sweep among `candidates`: run id -> how the sweep has it: `made` (the
    run carries the sweep's tag), `reused` or `resumed` (made before, taken by the sweep)."""
    taken = sweeps.taken(root, sweep)
    return {run.id: "made" if sweep_id(run) == sweep else taken[run.id] for run in candidates
            if sweep_id(run) == sweep or run.id in taken}


def sweep_runs(root: Path, sweep: str) -> tuple[list[Run], dict[str, str]]:
    """The runs of a sweep, oldest first (a search's in the order of its trials), and how the
    sweep has each (sweep_points)."""
    candidates = list(iter_runs(root))
    points = sweep_points(root, sweep, candidates)
    found = [run for run in candidates if run.id in points]
    found.sort(key=lambda run: trial_place(run).get("trial", -1))
    if not found:
        known = sorted({s for s in map(sweep_id, candidates) if s})
        listed = f"; sweeps in {root}: {', '.join(known)}" if known else ""
        raise KdlError(f"no runs of sweep {sweep!r} in {root}{listed}")
    return found, points


def run_record(run: Run, how: str | None = None) -> dict[str, Any]:
    """What a comparison needs from one run: its flat config, final metrics and best metric,
    and for a sweep's point how the sweep has it (sweep_points).

    A run still going has no summary.json yet; its best so far comes from meta.json."""
    summary = run.summary()
    return {
        "id": run.id,
        "name": run.meta.get("name"),
        "status": run.status,
        "task": run.meta.get("task"),
        "config": flatten(run.config_dict()),
        "final": final_metrics(summary),
        "best": current_best(run),
        "metric_modes": run.meta.get("metric_modes") or {},
        "trial": trial_place(run),
        "how": how,
    }


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n-1; None for a single value) and n."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if n > 1 else None,
            "n": n}


def compare(records: list[dict[str, Any]], group_by: list[str] | None = None) -> Comparison:
    """Compare run records: per run, or with `group_by` per group as mean, std and n of each metric."""
    if not records:
        raise KdlError("nothing to compare: give run ids or --sweep ID")
    best_metric = _common_best_metric(records)
    best_mode = _best_mode(records, best_metric)
    metrics = [*_metric_names(records), "best"]
    varying = varying_keys([r["config"] for r in records])
    values = [_metric_values(r, metrics, best_metric) for r in records]
    tasks = dict(collections.Counter(r.get("task") or "unknown" for r in records))
    # a best across tasks would weigh incomparable things (nats per character against a
    # classifier's cross-entropy): none is marked, and the note says why
    like = len(tasks) == 1
    if not group_by:
        rows = [{"id": r["id"], "name": r["name"], "status": r["status"],
                 "trial": r.get("trial") or {}, "how": r.get("how"),
                 "config": {k: r["config"].get(k) for k in varying}, "metrics": v}
                for r, v in zip(records, values, strict=True)]
        best_row = _best_index([row["metrics"]["best"] for row in rows], best_mode) if like else None
        return Comparison(varying, metrics, best_metric, best_mode, rows, best_row, tasks=tasks)
    _check_group_keys(group_by, records)
    rows = group_stats(records, values, group_by, metrics)
    best_row = _best_index([row["metrics"]["best"]["mean"] for row in rows], best_mode) if like else None
    averaged_over = [key for key in varying if key not in group_by]
    return Comparison(list(group_by), metrics, best_metric, best_mode, rows, best_row,
                      list(group_by), averaged_over, tasks)


def group_stats(records: list[dict[str, Any]], values: list[dict[str, Any]], group_by: list[str],
                metrics: list[str]) -> list[dict[str, Any]]:
    """One row per distinct value of the group_by keys: its runs and mean/std/n of every metric."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, record in enumerate(records):
        group = tuple(hashable(record["config"].get(key)) for key in group_by)
        groups.setdefault(group, []).append(index)
    rows = []
    for members in groups.values():
        first = records[members[0]]["config"]
        stats = {m: mean_std([values[i][m] for i in members if is_number(values[i][m])])
                 for m in metrics}
        rows.append({"values": {key: first.get(key) for key in group_by}, "n": len(members),
                     "runs": [records[i]["id"] for i in members], "metrics": stats})
    return sorted(rows, key=lambda row: [_sortable(row["values"][k]) for k in group_by])


def _check_group_keys(group_by: list[str], records: list[dict[str, Any]]) -> None:
    import difflib

    known = dict.fromkeys(key for r in records for key in r["config"])
    for key in group_by:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise KdlError(f"--group-by {key}: not a config key of these runs{hint}")


def _metric_names(records: list[dict[str, Any]]) -> list[str]:
    names = list(dict.fromkeys(name for r in records for name in r["final"]))
    return sorted(names, key=lambda name: not name.startswith("val."))  # stable: val first


def _metric_values(record: dict[str, Any], metrics: list[str], best_metric: str | None) -> dict[str, Any]:
    values = {m: record["final"].get(m) for m in metrics if m != "best"}
    best = record["best"]
    # a best value is comparable only with others of the same metric
    values["best"] = best.get("value") if best.get("metric") == best_metric else None
    return values


def _common_best_metric(records: list[dict[str, Any]]) -> str | None:
    names = [r["best"].get("metric") for r in records if r["best"].get("metric")]
    return max(dict.fromkeys(names), key=names.count) if names else None


def _best_mode(records: list[dict[str, Any]], best_metric: str | None) -> str | None:
    """As the runs recorded it with their best value, else as their tasks declare the metric;
    None if no run says (then no row is marked best)."""
    modes = [r["best"].get("mode") for r in records if r["best"].get("metric") == best_metric]
    if best_metric:
        modes += [r.get("metric_modes", {}).get(best_metric.split(".", 1)[-1]) for r in records]
    return next((m for m in modes if m in ("min", "max")), None)


def _best_index(values: list[Any], mode: str | None) -> int | None:
    scored = [(v, i) for i, v in enumerate(values) if is_number(v) and math.isfinite(v)]
    if not scored or mode is None:
        return None
    return (min(scored) if mode == "min" else max(scored, key=lambda pair: (pair[0], -pair[1])))[1]


def flat_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """The comparison as flat rows for CSV: config keys and metrics as columns."""
    flat = []
    for row in comparison.rows:
        if comparison.group_by:
            stats = {f"{m}.{stat}": row["metrics"][m][stat]
                     for m in comparison.metrics for stat in ("mean", "std", "n")}
            flat.append({**row["values"], "n": row["n"], **stats, "runs": " ".join(row["runs"])})
        else:
            flat.append({"id": row["id"], "name": row["name"], "status": row["status"],
                         **({"how": row["how"]} if row["how"] else {}),
                         **row["trial"], **row["config"], **row["metrics"],
                         "best_metric": comparison.best_metric})
    return flat
