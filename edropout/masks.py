"""Applying a state to a network like a dropout mask, with forward hooks (the network's code is unchanged).

A dropped Conv2d output channel is zeroed after the BatchNorm2d that consumes it (if one does) or else
right after the convolution, for every sample, in train and eval mode: so it contributes exactly nothing,
BatchNorm's bias included. A dropped Linear input feature is zeroed at the Linear's input. Multiplying by
the mask also zeroes the gradients of everything that only feeds dropped units; their weights stay as they
are, so a unit dropped now can come back later.

While scoring K candidate states in one batched forward (:meth:`UnitMasks.candidates`), the batch is
repeated K times and part k of it gets candidate k's mask. The hooks also keep, when asked, a running
mean of each unit's activity (mean |output| before masking) for the Ising energy's fields.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Dict, Optional

import torch
from torch import nn

from .units import PrunableUnits

ACTIVITY_MOMENTUM = 0.1  # of the running mean of each unit's activity (the Ising fields)

__all__ = ["UnitMasks"]


class UnitMasks:
    """The mask hooks of one model. ``mask`` (float [D], 1 = keep) is the applied state: copy a new state
    into it to apply it. ``activity`` is the running mean of each unit's mean |output|, updated by
    training-mode forwards while ``collect`` is on (momentum ``ACTIVITY_MOMENTUM``)."""

    def __init__(self, model: nn.Module, units: PrunableUnits, batchnorm_after: Dict[str, str]):
        device = next(model.parameters()).device
        D = units.num_units
        self.units = units
        self.mask = torch.ones(D, device=device)
        self.activity = torch.zeros(D, device=device)
        self.collect = False
        self.enabled = True
        self._candidates: Optional[torch.Tensor] = None
        self._handles = []
        modules = dict(model.named_modules())
        for layer in units:
            if layer.kind == "conv_out":
                target = modules[batchnorm_after.get(layer.name, layer.name)]
                self._handles.append(target.register_forward_hook(partial(self._after, layer.start, layer.stop)))
            elif layer.kind == "linear_in":
                self._handles.append(
                    layer.module.register_forward_pre_hook(partial(self._before, layer.start, layer.stop)))

    def remove(self) -> None:
        """Remove the hooks: the model runs as if every unit were kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def candidates(self, states: torch.Tensor):
        """Within the context, a forward of a batch repeated K times applies state k to part k."""
        previous, self._candidates = self._candidates, states.to(self.mask.dtype)
        try:
            yield
        finally:
            self._candidates = previous

    def _apply(self, x: torch.Tensor, start: int, stop: int, channel_dim: int) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[channel_dim] = stop - start
        masks = self.mask if self._candidates is None else self._candidates
        masks = masks[..., start:stop]
        if masks.dtype != x.dtype:
            masks = masks.to(x.dtype)
        if self._candidates is not None:
            K = masks.shape[0]
            return (x.view(K, -1, *x.shape[1:]) * masks.view(K, *shape)).view_as(x)
        return x * masks.view(shape)

    def _record(self, start: int, stop: int, values: torch.Tensor) -> None:
        self.activity[start:stop].lerp_(values.to(self.activity.dtype), ACTIVITY_MOMENTUM)

    def _after(self, start, stop, module, inputs, output):
        if self.collect and module.training and self._candidates is None:
            self._record(start, stop, output.detach().abs().transpose(0, 1).reshape(stop - start, -1).mean(1))
        if not self.enabled:
            return output
        return self._apply(output, start, stop, channel_dim=1)

    def _before(self, start, stop, module, args):
        x = args[0]
        if self.collect and module.training and self._candidates is None:
            self._record(start, stop, x.detach().abs().reshape(-1, stop - start).mean(0))
        if not self.enabled:
            return None
        return (self._apply(x, start, stop, channel_dim=x.dim() - 1),) + tuple(args[1:])
