"""EDropout: energy-based dropout and pruning of deep networks."""

from . import _C  # noqa: F401  (registers the torch.ops.edropout kernels)
from . import ops, reference

__all__ = ["ops", "reference"]
__version__ = "0.1.0"
