"""EDropout: energy-based dropout and pruning of deep networks."""

import torch  # noqa: F401  (loads libtorch, which the kernels link against)

from . import _C  # noqa: F401  (registers the torch.ops.edropout kernels)
from . import ops, reference
from .layout import LayerUnits, unit_layout

__all__ = ["ops", "reference", "unit_layout", "LayerUnits"]
__version__ = "0.1.0"
