"""EDropout: energy-based dropout and pruning of deep networks."""

import torch  # noqa: F401  (loads libtorch, which the kernels link against)

from . import _C  # noqa: F401  (registers the torch.ops.edropout kernels)
from . import ops, reference
from .units import Layer, PrunableUnits, prunable_units

__all__ = ["ops", "reference", "prunable_units", "PrunableUnits", "Layer"]
__version__ = "0.1.0"
