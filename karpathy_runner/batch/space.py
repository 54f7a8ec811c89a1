"""A search's space: `--space KEY=DIST` items (uniform, loguniform, int, choice) as Optuna
distributions, each checked to make a valid config before any trial runs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KdlError, quoted
from .sweep import check_point, split_values, yaml_value

SPACE_FORM = ("write --space KEY=DIST with DIST one of uniform(a,b), loguniform(a,b), int(a,b), "
              "choice(v1,v2,...), e.g. --space 'optimizer.lr=loguniform(1e-4,1e-1)'")
DIST_PATTERN = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Dimension:
    """One --space KEY=DIST: a config key and the distribution its values are drawn from."""

    key: str
    kind: str  # uniform, loguniform, int or choice
    values: tuple[Any, ...]  # (low, high), or the choices as YAML values
    text: str  # as given on the command line

    def suggest(self, trial: Any) -> Any:
        """The value Optuna draws for this key in `trial` (a queued trial: its queued value)."""
        if self.kind == "choice":  # Optuna's choices are scalars; ours may be lists: their text
            return trial.suggest_categorical(self.key, [yaml_value(v) for v in self.values])
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_float(self.key, *self.values, log=self.kind == "loguniform")

    def value(self, sampled: Any) -> Any:
        """The config value of what Optuna sampled (a choice goes back from its text)."""
        if self.kind == "choice":
            return self.values[[yaml_value(v) for v in self.values].index(sampled)]
        return sampled

    def grid(self) -> list[Any]:
        """The values a grid search walks: the choices, or every integer of an int range."""
        if self.kind == "choice":
            return [yaml_value(v) for v in self.values]
        if self.kind == "int" and self.values[1] - self.values[0] < 10_000:
            return list(range(self.values[0], self.values[1] + 1))
        raise KdlError(f"--search grid walks listed values: --space {self.text} is continuous; "
                       "give it as choice(v1,v2,...) (or int(a,b)), or use --search tpe or random")


def parse_space(items: list[str]) -> list[Dimension]:
    """`--space KEY=DIST` items as dimensions; every mistake names the item and the fix."""
    if not items:
        raise KdlError(f"an adaptive search needs at least one --space item: {SPACE_FORM}")
    space: list[Dimension] = []
    for item in items:
        dimension = _dimension(item)
        if any(d.key == dimension.key for d in space):
            raise KdlError(f"--space {dimension.key!r} is given twice; keep one distribution per key")
        space.append(dimension)
    return space


def _dimension(item: str) -> Dimension:
    key, sep, dist = item.partition("=")
    key = key.strip()
    found = DIST_PATTERN.match(dist) if sep and key else None
    if found is None:
        raise KdlError(f"--space {item!r} is malformed: {SPACE_FORM}")
    kind, args = found.group(1), found.group(2)
    texts = [] if not args.strip() else split_values(args)
    if kind == "choice":
        if not texts or any(not t for t in texts):
            raise KdlError(f"--space {item}: choice() needs values, e.g. choice(16,32,64) or "
                           "choice([16,32],[32,64])")
        return Dimension(key, kind, tuple(_yaml(key, t, item) for t in texts), item)
    if kind not in ("uniform", "loguniform", "int"):
        raise KdlError(f"--space {item}: unknown distribution {kind!r}; {SPACE_FORM}")
    bounds = [_yaml(key, t, item) for t in texts]
    number = int if kind == "int" else (int, float)
    if len(bounds) != 2 or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds):
        what = "two integers" if kind == "int" else "two numbers"
        raise KdlError(f"--space {item}: {kind}() takes {what}, low and high, e.g. {kind}(1,8)")
    low, high = bounds
    if not all(math.isfinite(b) for b in bounds):  # Optuna would draw from no range
        raise KdlError(f"--space {quoted(item)}: {kind}() takes finite bounds (not .inf or .nan), "
                       f"e.g. {kind}(1,8)")
    if not low < high:
        raise KdlError(f"--space {item}: the low bound must be below the high one")
    if kind == "loguniform" and low <= 0:
        raise KdlError(f"--space {item}: loguniform's bounds must be above 0 (a log scale has no "
                       f"0 or negatives), e.g. loguniform({high / 1000:g},{high:g})")
    return Dimension(key, kind, (float(low), float(high)) if kind != "int" else (low, high), item)


def _yaml(key: str, text: str, item: str) -> Any:
    from ..config.loading import parse_override
    from ..errors import ConfigError

    try:
        return parse_override(f"{key}={text}", "--space")[1]
    except ConfigError as exc:
        if "is refused" in str(exc):  # beyond the bounds of YAML in a config file
            raise
        raise KdlError(f"--space {quoted(item)}: {quoted(text)} is not a YAML value") from None


def check_space(config: Path, base: list[str], space: list[Dimension]) -> None:
    """Every bound and every choice must make a valid config, before any trial runs."""
    for dimension in space:
        for value in dimension.values:
            check_point(config, base, {dimension.key: value}, option="--space")


