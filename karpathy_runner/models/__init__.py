"""Networks. A model family's config class (config/models.py) names its `build(cfg, info)`, which
makes the network from the family's own branch and the shapes the data reports (`DataInfo`),
never the whole config. A model file knows nothing about training.

`Model` is the base of kdl's networks: it declares the hooks asked of a model, its parameter
groups and its exportable form, with their defaults; any torch.nn.Module serves, as one group,
exported as it is.
"""

from __future__ import annotations

from torch import nn

from ..config.families import ModelConfig, builder
from ..data import DataInfo


class Model(nn.Module):
    # True: a group's weight decay is divided by its lr multiplier, so that every parameter
    # decays by lr x weight_decay per step whatever its group's lr (airbench's rule); False:
    # torch's, the decay per step grows with the group's lr
    decay_at_base_lr: bool = False

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, lr multiplier) pairs: by default every parameter at the optimizer's lr."""
        return [(list(self.parameters()), 1.0)]

    def exportable(self) -> nn.Module:
        """The same function in a form that torch.export and the ONNX exporter take (`kdl
        export`): by default the model itself."""
        return self


def build_model(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    """The network the `model` branch names, built by its family (its config class's BUILD)."""
    return builder(cfg)(cfg, info)
