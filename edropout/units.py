"""Where a network's units are: one block per layer, in module order.

Units are every ``Conv2d`` output channel (a kernel) and every ``Linear`` input feature (a hidden unit);
when the network ends in a ``Linear`` classifier, its outputs are units too, always kept. With 102
classes this gives D = 3046 (SqueezeNet 1.1), 5414 (ResNet-18), 9126 (ResNet-34), 18662 (AlexNet),
28710 (ResNet-50) and 54822 (ResNet-101).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

__all__ = ["LayerUnits", "unit_layout"]


@dataclass(frozen=True)
class LayerUnits:
    name: str  # the module's name in the model ("" for the classifier's outputs)
    kind: str  # "conv_out", "linear_in" or "classifier_out"
    size: int  # number of units
    always_kept: bool = False

    def kernels(self, module: nn.Module) -> torch.Tensor:
        """The unit's weights, one row per unit: conv kernels flattened, or Linear weight columns."""
        if self.kind == "conv_out":
            return module.weight.detach().flatten(1)
        if self.kind == "linear_in":
            return module.weight.detach().t()
        raise ValueError(f"{self.kind} units have no kernels")


def unit_layout(model: nn.Module) -> List[LayerUnits]:
    """The blocks of units of ``model``, in module order (see the module docstring)."""
    layers: List[LayerUnits] = []
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            layers.append(LayerUnits(name, "conv_out", module.out_channels))
            last = module
        elif isinstance(module, nn.Linear):
            layers.append(LayerUnits(name, "linear_in", module.in_features))
            last = module
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer: it has no prunable units")
    if isinstance(last, nn.Linear):
        layers.append(LayerUnits("", "classifier_out", last.out_features, always_kept=True))
    return layers
