"""When the search's state freezes: :class:`FreezeRule`, the one place that decides it.

The state freezes once it has **settled**, or at a **deadline**, whichever comes first:

* settled (Early-Bird's rule, You et al., ICLR 2020): every ``every`` steps the applied state is recorded;
  once ``window`` of them are, the state freezes when the newest differs from each of the others in at most
  ``distance`` of the prunable units (the normalised Hamming distance). Early-Bird records one mask per
  epoch with a window of 5 and a distance of 0.1.
* the deadline: at the end of epoch ``deadline`` whatever happens, since a search that keeps exploring may
  never settle.

``distance=None`` never settles, ``deadline=None`` has no deadline; both None: the state freezes only when
told to (``EDropout.freeze``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["FreezeRule"]


class FreezeRule:
    """See the module docstring. ``distances`` holds, per check with a full window, the largest distance
    between the newest recorded state and the others (what ``distance`` is compared with)."""

    def __init__(self, distance: Optional[float] = None, window: int = 5, every: int = 10,
                 deadline: Optional[int] = None):
        if distance is not None and (isinstance(distance, bool) or not 0.0 < distance <= 1.0):
            raise ValueError(f"distance must be a fraction of the units in (0, 1] or None, got {distance!r}")
        for name, value, least in (("window", window, 2), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int) or deadline < 1):
            raise ValueError(f"deadline must be an epoch of at least 1 or None, got {deadline!r}")
        self.distance, self.window, self.every, self.deadline = distance, window, every, deadline
        self.history: List[Tensor] = []  # the last `window` recorded states (bool [D])
        self.distances: List[float] = []

    def settled(self, step: int, state: Tensor, prunable: Tensor) -> bool:
        """After training step ``step`` (counted from 1) with ``state`` applied: whether it has settled
        (records the state every ``every`` steps)."""
        if step % self.every:
            return False
        self.history = (self.history + [state.bool().clone()])[-self.window:]
        if len(self.history) < self.window:
            return False
        newest, others = self.history[-1], torch.stack(self.history[:-1])
        units = prunable.bool()
        largest = float(((others != newest) & units).sum(dim=1).max()) / max(1, int(units.sum()))
        self.distances.append(largest)
        return self.distance is not None and largest <= self.distance

    def due(self, epochs_ended: int) -> bool:
        """Whether the deadline has come once ``epochs_ended`` epochs have ended."""
        return self.deadline is not None and epochs_ended >= self.deadline

    def state_dict(self) -> dict:
        return {"history": [s.to(torch.uint8) for s in self.history], "distances": list(self.distances)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [s.bool() for s in state.get("history", [])]
        self.distances = list(state.get("distances", []))

    def __repr__(self) -> str:
        return (f"FreezeRule(distance={self.distance}, window={self.window}, every={self.every}, "
                f"deadline={self.deadline})")
