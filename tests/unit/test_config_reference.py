"""The config reference: docs/config.md is what `kdl validate --reference` generates from the
config classes, every key in it says what it is, and a family registered from outside appears."""

from __future__ import annotations

import pytest
import toytask
from kdl import ROOT, kdl

from karpathy_runner.config import families
from karpathy_runner.config.reference import COMMAND

DOC = ROOT / "docs" / "config.md"


def reference() -> str:
    result = kdl("validate", "--reference")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_docs_config_md_is_what_the_config_classes_generate():
    committed = DOC.read_text(encoding="utf-8") if DOC.is_file() else "(no docs/config.md)"
    assert committed == reference(), f"docs/config.md is out of date with the config classes; run: {COMMAND}"


def test_every_key_says_what_it_is():
    rows = [line.split(" | ") for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    undescribed = [row[0].strip("| `") for row in rows if not row[-1].removesuffix(" |").strip()]
    assert not undescribed, f"keys without a Field(description=...): {', '.join(undescribed)}"


@pytest.fixture
def toy():
    """The toy task family, registered as an outside family registers (one call), for one test."""
    families.register(toytask.ToyPairConfig)
    yield
    families.unregister(toytask.ToyPairConfig)


def test_a_family_registered_from_outside_has_its_section(toy):
    text = reference()
    assert "`task.name` picks the task family; the families, in the order they registered: `classify`; " \
           "`language_model`; `gan`; " in text and "; `toy_pair`." in text  # last: registered last
    heading = "### `task.name`: `toy_pair`"
    assert heading in text
    section = text[text.index(heading):text.index("## `optimizer`")]
    assert "- Models (each with its optimizer): `encoder`, `head`." in section
    assert ("- Metrics: `loss` (lower is better: min), `head_loss` (lower is better: min), `accuracy` "
            "(higher is better: max).") in section
    assert "- Default metric (`train.best_metric` when not set): `val.loss`." in section
    assert "- Trains: on `image` data `cnn`." in section
    assert "| `task.conv_lr_scale` | float | `0.1` | > 0.0 |" in section
    assert "| `task.poison_phase` | int | `2` | one of `1`, `2` |" in section
