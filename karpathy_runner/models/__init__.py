"""Model registry: the `model` branch's class names its module (MODULE), whose
`build(cfg, info) -> nn.Module` makes the network.

A model module knows nothing about training: it receives its own config branch and the shapes
the data reports (`DataInfo`), never the whole config.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn


def build_model(cfg: Any, info: Any) -> nn.Module:
    module = importlib.import_module(f"{__name__}.{type(cfg).MODULE}")
    return module.build(cfg, info)


def model_preprocessing(cfg: Any) -> Any:
    """The data preparation a model's pretrained weights expect (data.Preprocessing), or None:
    a model module may say, through its `preprocessing(cfg)`."""
    module = importlib.import_module(f"{__name__}.{type(cfg).MODULE}")
    return module.preprocessing(cfg) if hasattr(module, "preprocessing") else None
