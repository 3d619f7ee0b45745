"""EDropout: energy-based dropout and pruning of deep networks."""

import torch  # noqa: F401  (loads libtorch, which the kernels link against)

from . import _C  # noqa: F401  (registers the torch.ops.edropout kernels)
from . import energies, ops, reference
from .controller import EDropout
from .energies import EnergyLoss, IsingEnergy
from .slim import load_slim, save_slim, slim
from .units import Layer, PrunableUnits, prunable_units

__all__ = ["EDropout", "IsingEnergy", "EnergyLoss", "energies", "ops", "reference", "prunable_units",
           "PrunableUnits", "Layer", "slim", "load_slim", "save_slim"]
__version__ = "0.1.0"
