"""Model registry: `model.name` -> module with `build(cfg, info) -> nn.Module`.

A model module knows nothing about training: it receives its own config branch and the shapes
the data reports (`DataInfo`), never the whole config.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

REGISTRY: dict[str, str] = {"cnn": "cnn"}


def build_model(cfg: Any, info: Any) -> nn.Module:
    module = importlib.import_module(f"{__name__}.{REGISTRY[cfg.name]}")
    return module.build(cfg, info)
