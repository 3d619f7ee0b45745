"""EDropout: energy-based dropout and pruning of deep networks.

The library: ``ops`` (the kernels) and ``reference`` (their plain-PyTorch references); ``units`` (a
network's prunable units), ``graph`` (how channels flow), ``masks`` (applying a state); ``energies`` and
``criteria`` (scoring or choosing states); ``controller`` (``EDropout``, the object a training loop
touches); ``earlybird`` (Early-Bird tickets, a control that drives the controller); ``slim`` (a state made physical); ``distributed``; ``models`` (the paper's networks). The
experiment harness, the ``edropout`` command, lives apart in :mod:`edropout.experiments`.
"""

import torch  # noqa: F401  (loads libtorch, which the kernels link against)

from . import _build

_build.check()  # kernels built against another torch: one line naming both, not an undefined symbol
try:
    from . import _C  # noqa: F401  (registers the torch.ops.edropout kernels)
except ImportError as e:
    raise _build.load_failed(e) from None
from . import criteria, energies, ops, reference
from .controller import EDropout
from .earlybird import EarlyBird
from .energies import EnergyLoss, IsingEnergy, MarginEnergy
from .freezing import FreezeRule, ReleasedCodeRule
from .pruning import PrunedNetwork, prune
from .slim import kept_parameters, slim
from .slimfile import load_slim, save_slim
from .units import Layer, PrunableUnits, prunable_units

__all__ = ["EDropout", "IsingEnergy", "EnergyLoss", "MarginEnergy", "energies", "criteria", "ops", "reference", "prunable_units",
           "PrunableUnits", "Layer", "slim", "kept_parameters", "load_slim", "save_slim", "prune", "PrunedNetwork",
           "FreezeRule", "ReleasedCodeRule", "EarlyBird"]
__version__ = "0.1.0"
