"""Criteria: states chosen without a search, for the controls a pruning result is measured against.

A criterion ranks the units of each layer; ``criterion.state(units, like)`` keeps, in each layer, as many
units as the state ``like`` keeps there (the same per-layer widths), those it ranks first. The classifier's
outputs are always kept. One small class per criterion, as Torch-Pruning's importance classes:

    Magnitude()      the units of largest kernel L2 norm (magnitude pruning)
    Random(seed)     units drawn at random (a random state of the same widths, trained from scratch)

``Uniform(seed).state(model, units, params)`` instead keeps the same fraction of every layer (drawn at
random), the fraction set so that the kept parameters come closest to ``params`` (the uniform-width control
of Liu et al., ICLR 2019: whether a pruning method's per-layer widths are worth anything).
:func:`matching_parameters` is how such a state is matched to a parameter count.

Per layer, because kernel norms of different layers are not comparable (a conv kernel has 9·C weights, a
Linear column one per class): ranked over the whole network, the classifier's inputs would go first.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .slim import kept_parameters
from .units import Layer, PrunableUnits

__all__ = ["Criterion", "Magnitude", "Random", "Uniform", "matching_parameters"]


class Criterion:
    """Ranks each layer's units, most worth keeping first."""

    def ranking(self, layer: Layer) -> Tensor:
        raise NotImplementedError

    def state(self, units: PrunableUnits, like: Tensor) -> Tensor:
        """bool [D] on the CPU: in each layer, as many units as ``like`` (a state, [D]) keeps there, those
        ranked first; the always-kept units kept."""
        like = like.cpu().bool()
        if like.shape != (units.num_units,):
            raise ValueError(f"like must be a state of shape [{units.num_units}], got {list(like.shape)}")
        state = units.always_kept()
        for layer in units:
            if not layer.always_kept:
                count = int(like[layer.start:layer.stop].sum())
                state[layer.start + self.ranking(layer)[:count]] = True
        return state


class Magnitude(Criterion):
    """Units of larger kernel L2 norm first."""

    def ranking(self, layer):
        norms = layer.kernels().float().norm(dim=1).cpu()
        return torch.sort(norms, descending=True, stable=True).indices


class Random(Criterion):
    """Units in a random order, drawn anew (from ``seed``) for each state."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._generator = torch.Generator()

    def state(self, units, like):
        self._generator.manual_seed(self.seed)
        return super().state(units, like)

    def ranking(self, layer):
        return torch.randperm(layer.size, generator=self._generator)

    def fraction(self, units: PrunableUnits, percent: float) -> Tensor:
        """bool [D]: ``percent`` % of all the prunable units, drawn at random across layers (always-kept
        units kept)."""
        kept = units.always_kept()
        prunable = torch.nonzero(~kept).flatten()
        order = torch.randperm(prunable.numel(), generator=torch.Generator().manual_seed(self.seed))
        kept[prunable[order[: round(percent / 100.0 * prunable.numel())]]] = True
        return kept


def matching_parameters(model, units: PrunableUnits, states: Callable[[int], Tensor], count: int,
                        params: int) -> Tensor:
    """The state ``states(i)``, i in 0..``count``, whose kept parameters #p
    (:func:`edropout.kept_parameters`) come closest to ``params``; #p must not shrink as i grows (a
    bisection: about log2(count) + 2 counts)."""
    kept = lambda i: kept_parameters(model, states(i), units)[1]  # noqa: E731
    low, high = 0, count
    while low < high:  # the smallest i with #p >= params
        middle = (low + high) // 2
        if kept(middle) >= params:
            high = middle
        else:
            low = middle + 1
    return states(min((i for i in (low - 1, low) if 0 <= i), key=lambda i: abs(kept(i) - params)))


class Uniform:
    """The same fraction of the units kept in every prunable layer (at least one), drawn at random (from
    ``seed``; a larger fraction keeps a superset), the fraction (to 1/1000) set so that the kept parameters
    come closest to ``params``."""

    STEPS = 1000

    def __init__(self, seed: int):
        self.seed = int(seed)

    def state(self, model, units: PrunableUnits, params: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        layers = [(layer, torch.randperm(layer.size, generator=generator)) for layer in units if not layer.always_kept]

        def keeping(step: int) -> Tensor:
            state = units.always_kept()
            for layer, order in layers:
                state[layer.start + order[: max(1, round(step * layer.size / self.STEPS))]] = True
            return state

        return matching_parameters(model, units, keeping, self.STEPS, params)

