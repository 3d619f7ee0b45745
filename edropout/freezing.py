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

:class:`ReleasedCodeRule` is the released research code's rule instead of settling (``--freeze reference``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["FreezeRule", "ReleasedCodeRule"]


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

    def settled(self, step: int, state: Tensor, prunable: Tensor, best_energy: Optional[Tensor] = None) -> bool:
        """After training step ``step`` (counted from 1) with ``state`` applied (``best_energy``: the
        population's best energy then): whether it has settled (records the state every ``every`` steps)."""
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


class ReleasedCodeRule(FreezeRule):
    """The released code's rule (its edropout.py, lines 571-581): from epoch ``start`` (counted from 1) on,
    from the 12th batch of each epoch of ``epoch_steps`` steps (its ``batch_idx > 10``), the state freezes
    once the population's best energy equals one of the 9 before it (its ``collect_cost_best_state[-10:-1]
    == collect_cost_best_state[-1]``). With parents' energies kept from when they were scored
    (:class:`~edropout.energies.MarginEnergy`), the best energy repeats whenever no trial beats the best, so
    the state freezes within a few steps of that batch. ``deadline``: as :class:`FreezeRule`'s."""

    WINDOW = 9  # best energies before the newest that it is compared with
    FIRST_BATCH = 11  # the first batch of an epoch (counted from 0) before which the rule is checked

    def __init__(self, start: int, epoch_steps: int, deadline: Optional[int] = None):
        super().__init__(deadline=deadline)
        for name, value in (("start", start), ("epoch_steps", epoch_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        self.start, self.epoch_steps = start, epoch_steps
        self.best_energies: List[Tensor] = []  # the last WINDOW + 1, device tensors (no sync per step)

    def settled(self, step: int, state: Tensor, prunable: Tensor, best_energy: Optional[Tensor] = None) -> bool:
        if best_energy is None:
            return False
        self.best_energies = (self.best_energies + [best_energy.detach().reshape(()).clone()])[-(self.WINDOW + 1):]
        epoch, batch = divmod(step, self.epoch_steps)  # of the next step, from 0
        if epoch + 1 < self.start or batch < self.FIRST_BATCH or len(self.best_energies) < 2:
            return False
        *before, newest = self.best_energies
        return bool((torch.stack([e.to(newest.device) for e in before]) == newest).any())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_energies": [e.cpu() for e in self.best_energies]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.best_energies = list(state.get("best_energies", []))

    def __repr__(self) -> str:
        return f"ReleasedCodeRule(start={self.start}, epoch_steps={self.epoch_steps}, deadline={self.deadline})"
