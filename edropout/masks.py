"""Applying a state to a network like a dropout mask, without changing the network's code.

A dropped Conv2d output channel is zeroed after the BatchNorm that consumes it (if one does) or else
right after the convolution, for every sample, in train and eval mode: so it contributes exactly nothing,
BatchNorm's bias included. A dropped Linear input feature is zeroed at the Linear's input. A dropped
attention head's columns of the output projection are zeroed (the module's forward runs with that weight),
so the head contributes nothing and none of its weights gets a gradient; heads record no activity (their
Ising field is 0: the couplings alone score them). The zero costs
no pass over the activations where a layer can absorb the mask exactly:

* a BatchNorm after the conv runs with its affine parameters masked, y = (γ⊙m)·x̂ + β⊙m, which is 0 for
  a dropped channel and passes it no gradient (a multiplication over C numbers, not B×C×H×W);
* a Linear runs with the mask in its weight's columns, x (W⊙m)ᵀ + b, when W is no larger than its input.

Elsewhere (a conv with no BatchNorm after it, a large Linear, a layer of another type) the activation is
multiplied by the mask. Either way a dropped unit's weights get exactly zero gradient and stay as they
are, so a unit dropped now can come back later.

While scoring K candidate states in one batched forward (:meth:`UnitMasks.candidates`), the batch is
repeated K times and part k of it gets candidate k's mask (multiplied in). With ``batch_statistics``, every
BatchNorm normalises part k with part k's own batch statistics (as K separate train-mode forwards would, the
running statistics untouched). The masks also keep, when asked,
a running mean of each unit's activity (mean |output| before masking) for the Ising energy's fields.
"""

from __future__ import annotations

import contextlib
from functools import partial
from types import SimpleNamespace
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .units import PrunableUnits, head_columns, output_projection, output_projection_name

ACTIVITY_MOMENTUM = 0.1  # of the running mean of each unit's activity (the Ising fields)

__all__ = ["UnitMasks"]


class UnitMasks:
    """The masks of one model (absorbed by a BatchNorm or Linear's forward, else a hook). ``mask`` (float
    [D], 1 = keep) is the applied state: copy a new state into it to apply it. ``activity`` is the running
    mean of each unit's mean |output|, updated by training-mode forwards while ``collect`` is on (momentum
    ``ACTIVITY_MOMENTUM``)."""

    def __init__(self, model: nn.Module, units: PrunableUnits, batchnorm_after: Dict[str, str]):
        device = next(model.parameters()).device
        D = units.num_units
        self.units = units
        self.mask = torch.ones(D, device=device)
        # each layer's part of the mask, a view made once (a slice per forward is an operation per layer)
        self._layer_mask = {layer.start: self.mask[layer.start : layer.stop] for layer in units}
        self.activity = torch.zeros(D, device=device)
        self.collect = False
        self.enabled = True
        self._candidates: Optional[torch.Tensor] = None
        self._batch_statistics = False
        self._batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self._handles = []
        self._absorbing = []  # modules whose forward is replaced by one that absorbs the mask
        self.ran: Optional[set] = set()  # first units of the layers whose masking ran, until not_run()
        modules = dict(model.named_modules())
        try:
            for layer in units:
                if layer.kind == "conv_out":
                    name = batchnorm_after.get(layer.name, layer.name)
                    target = modules[name]
                    if not (type(target).forward is _BatchNorm.forward and self._absorb(
                            name, target, partial(self._batchnorm, layer.start, layer.stop, target))):
                        self._handles.append(
                            target.register_forward_hook(partial(self._after, layer.start, layer.stop)))
                elif layer.kind == "heads":
                    if not self._absorb(layer.name, layer.module,
                                        partial(self._heads, layer.start, layer.stop, layer.module)):
                        raise ValueError(f"model: {layer.name}: its forward is replaced by other code, so its heads "
                                         f"cannot be masked; exclude it")
                elif layer.kind == "linear_in":
                    if not (type(layer.module).forward is nn.Linear.forward and self._absorb(
                            layer.name, layer.module, partial(self._linear, layer.start, layer.stop, layer.module))):
                        self._handles.append(
                            layer.module.register_forward_pre_hook(partial(self._before, layer.start, layer.stop)))
        except ValueError:
            self.remove()
            raise

    def _absorb(self, name: str, module: nn.Module, forward) -> bool:
        """Replace ``module``'s forward (on the instance) by ``forward``; False where something else
        replaced it already (then a hook masks it)."""
        current = module.__dict__.get("forward")
        if getattr(current, "absorbs_mask", False):
            raise ValueError(f"model: {name} is masked by another EDropout already; call its remove() first")
        if current is not None:
            return False
        forward.absorbs_mask = True  # a copy of the network (slim's) leaves it out
        module.forward = forward
        self._absorbing.append(module)
        return True

    def not_run(self) -> list:
        """The layers whose masking has not run since the masks were made (and stop watching): layers the
        network does not call through their own forward, whose units a state would not drop."""
        ran, self.ran = self.ran or set(), None
        return [layer.name for layer in self.units if layer.start not in ran and layer.kind != "classifier_out"]

    def _note_ran(self, start: int) -> None:
        if self.ran is not None:  # watched until not_run()
            self.ran.add(start)

    def remove(self) -> None:
        """Remove the hooks and the replaced forwards: the model runs as if every unit were kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._absorbing:
            del module.forward
        self._absorbing = []

    @contextlib.contextmanager
    def candidates(self, states: torch.Tensor, batch_statistics: bool = False):
        """Within the context, a forward of a batch repeated K times applies state k to part k; with
        ``batch_statistics``, each BatchNorm normalises part k with its own batch statistics."""
        previous = self._candidates, self._batch_statistics
        self._candidates, self._batch_statistics = states.to(self.mask.dtype), batch_statistics
        patched = []
        if batch_statistics:  # the BatchNorms that do not absorb a mask: through their own forward
            for bn in self._batchnorms:
                if "forward" not in bn.__dict__:
                    bn.forward = partial(self._candidate_batchnorm, bn)
                    patched.append(bn)
        try:
            yield
        finally:
            for bn in patched:
                del bn.forward
            self._candidates, self._batch_statistics = previous

    def _candidate_batchnorm(self, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        """``bn`` on a batch of K candidates' parts: each part's own batch statistics, or the running ones."""
        if not self._batch_statistics:
            return _BatchNorm.forward(bn, x)
        K, C = self._candidates.shape[0], x.shape[1]
        # (candidate, channel) pairs as channels: one batch_norm call gives each part its own statistics
        parts = x.reshape(K, -1, *x.shape[1:]).transpose(0, 1).reshape(-1, K * C, *x.shape[2:])
        weight = None if bn.weight is None else bn.weight.repeat(K)
        bias = None if bn.bias is None else bn.bias.repeat(K)
        y = F.batch_norm(parts, None, None, weight, bias, True, 0.0, bn.eps)
        return y.view(-1, K, C, *x.shape[2:]).transpose(0, 1).reshape(x.shape)

    def _multiply(self, x: torch.Tensor, start: int, stop: int, channel_dim: int) -> torch.Tensor:
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
        self._note_ran(start)
        if self.collect and module.training and self._candidates is None:
            self._record(start, stop, _mean_abs(output.detach(), channel_dim=1))
        if not self.enabled:
            return output
        return self._multiply(output, start, stop, channel_dim=1)

    def _batchnorm(self, start, stop, bn, x):
        """``bn``'s forward, its affine parameters masked (the activation multiplied when scoring candidates)."""
        self._note_ran(start)
        if not self.enabled:
            return self._after(start, stop, bn, (x,), _BatchNorm.forward(bn, x))
        if self._candidates is not None:
            return self._after(start, stop, bn, (x,), self._candidate_batchnorm(bn, x))
        mask = self._layer_mask[start]
        mask = mask if mask.dtype == x.dtype else mask.to(x.dtype)
        if self.collect and bn.training:  # the unmasked output's activity, from the batch's statistics
            with torch.no_grad():
                unmasked = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                self._record(start, stop, _mean_abs(unmasked, channel_dim=1))
        weight = mask if bn.weight is None else bn.weight * mask
        bias = None if bn.bias is None else bn.bias * mask
        return _batch_norm(bn, x, weight, bias)

    def _linear(self, start, stop, linear, x):
        """``linear``'s forward, the mask in its weight's columns where the weight is the smaller."""
        self._note_ran(start)
        if not self.enabled or self._candidates is not None or linear.weight.numel() > x.numel():
            (x,) = self._before(start, stop, linear, (x,)) or (x,)
            return F.linear(x, linear.weight, linear.bias)
        if self.collect and linear.training:
            self._record(start, stop, _mean_abs(x.detach(), channel_dim=x.dim() - 1))
        mask = self._layer_mask[start]
        mask = mask if mask.dtype == linear.weight.dtype else mask.to(linear.weight.dtype)
        return F.linear(x, linear.weight * mask, linear.bias)

    def _heads(self, start, stop, attention, *args, **kwargs):
        """``attention``'s forward with its output projection's columns of the dropped heads masked (when
        scoring candidates, part k of the batch with candidate k's heads)."""
        self._note_ran(start)
        forward = type(attention).forward
        if not self.enabled:
            return forward(attention, *args, **kwargs)
        if self._candidates is None:
            return forward(_Projected(attention, self._layer_mask[start]), *args, **kwargs)
        K = self._candidates.shape[0]
        dim = 1 if isinstance(attention, nn.MultiheadAttention) and not attention.batch_first else 0
        split = lambda t, d: t.chunk(K, d) if isinstance(t, torch.Tensor) else [t] * K  # noqa: E731
        parts_args = list(zip(*[split(a, dim) for a in args])) if args else [()] * K
        parts_kwargs = [{} for _ in range(K)]
        for key, value in kwargs.items():
            for k, part in enumerate(split(value, 0) if key == "key_padding_mask" else [value] * K):
                parts_kwargs[k][key] = part
        outputs = [forward(_Projected(attention, self._candidates[k, start:stop]), *parts_args[k], **parts_kwargs[k])
                   for k in range(K)]
        if isinstance(outputs[0], tuple):  # (output, attention weights or None)
            return tuple(None if o[0] is None else torch.cat(o, dim if i == 0 else 0)
                         for i, o in enumerate(zip(*outputs)))
        return torch.cat(outputs, dim)

    def _before(self, start, stop, module, args):
        self._note_ran(start)
        x = args[0]
        if self.collect and module.training and self._candidates is None:
            self._record(start, stop, _mean_abs(x.detach(), channel_dim=x.dim() - 1))
        if not self.enabled:
            return None
        return (self._multiply(x, start, stop, channel_dim=x.dim() - 1),) + tuple(args[1:])


class _Projected:
    """An attention module seen with its output projection's weight masked per head: its class's forward
    reads attributes only, so it runs on this view as on the module."""

    def __init__(self, attention: nn.Module, heads: torch.Tensor):
        proj = output_projection(attention)
        columns = head_columns(attention, heads.to(proj.weight.dtype))
        view = SimpleNamespace(weight=proj.weight * columns, bias=proj.bias, in_features=proj.in_features,
                               out_features=proj.out_features)
        self.__dict__.update(_attention=attention, **{output_projection_name(attention): view})

    def __getattr__(self, name):
        return getattr(self._attention, name)


def _batch_norm(bn: _BatchNorm, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """What ``_BatchNorm.forward`` computes (running statistics updated the same way), with ``weight`` and
    ``bias`` in place of the module's affine parameters."""
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None, weight, bias,
                        batch_stats, factor, bn.eps)


def _mean_abs(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Mean |x| per channel, without a tensor of |x| (an L1 norm reduces in one pass)."""
    dims = [d for d in range(x.dim()) if d != channel_dim]
    return torch.linalg.vector_norm(x, ord=1, dim=dims) / (x.numel() // x.shape[channel_dim])
