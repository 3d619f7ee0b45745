"""Training on after the freeze: the frozen state made physical, ``prune(ed, optimizer)``.

Once the state is frozen nothing about the dropped units can change, so the network need not pay for
them: ``prune`` returns a :class:`PrunedNetwork` whose ``model`` is :func:`edropout.slim` of the masked
network, to be trained from then on in its place, and rewires ``optimizer`` (in place, so a scheduler
bound to it carries on) to the slim network's parameters, its per-parameter state (Adadelta's square_avg
and acc_delta, SGD's momentum, ...) sliced to the kept entries::

    if ed.frozen and pruned is None:
        pruned = edropout.prune(ed, optimizer)
        model = pruned.model                       # train this one; optimizer now steps its parameters
    ...
    pruned.write_back()                            # ed.model: the slim weights at the kept units

Slimming removes what it can and masks the rest (a residual stream's channels stay, their BatchNorm γ
and β zeroed; see :mod:`edropout.slim`). Those zeroed entries are held at zero while training: their
gradient is masked (a tensor hook) and their optimiser state is zero, so a dropped unit never comes back,
and N steps of the slim network equal N steps of the masked one (up to the order of float sums).

The controller is left as it was: frozen, its masks on ``ed.model``, the full network, whose removed
units keep their weights as they were at the freeze (a masked channel's kernel stays in the slim network,
with zero gradient, and weight decay shrinks it there as it would in the masked network).
:meth:`PrunedNetwork.write_back` copies the slim network's values into it at the kept entries, so
``ed.model`` is then EDropout(P) with ``ed.pruned()`` (the same outputs as the slim network in eval mode)
and EDropout(F) with ``ed.full()``; a checkpoint of ``ed.model`` after ``write_back`` holds both, and
``prune`` of it again gives the same slim network.

Several processes: build it on every rank (the ranks hold the same state) before wrapping the slim
network in a new DistributedDataParallel.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import distributed
from .slim import _build, _copy_without_hooks, kept_by_layer, slim_plan

__all__ = ["prune", "PrunedNetwork"]


def prune(ed, optimizer: Optional[torch.optim.Optimizer] = None) -> "PrunedNetwork":
    """The slim network of the frozen controller ``ed`` to train on (module docstring); ``optimizer``
    (built over ``ed.model``'s parameters) is rewired to it in place. ValueError when the state is not
    frozen."""
    if not ed.frozen:
        raise ValueError("prune: the controller's state is not frozen yet (call ed.freeze() or wait for the freeze)")
    return PrunedNetwork(ed.model, ed.state, ed.units, optimizer)


class PrunedNetwork:
    """``model`` (the full network; a DDP wrapper is unwrapped) with ``state`` applied over ``units``, made
    physically slim for training: ``self.model``. ``optimizer``: see :func:`prune`."""

    def __init__(self, model: nn.Module, state: Tensor, units, optimizer: Optional[torch.optim.Optimizer] = None):
        self.full = distributed.unwrap(model)
        plan = slim_plan(self.full, kept_by_layer(units, state))
        self.model = _build(_copy_without_hooks(self.full), plan)
        # where each slim entry comes from: slimming a copy whose entries hold their own positions
        sources = _build(_labelled_copy(self.full), plan)
        full = dict(self.full.state_dict(keep_vars=True))
        self._source: Dict[str, Tensor] = {}  # slim tensor name -> flat index into the full tensor, -1: none
        self._held: Dict[str, Tensor] = {}    # parameter name -> bool, entries zeroed by slimming
        offsets = _offsets(self.full)
        for name, t in sources.state_dict(keep_vars=True).items():
            if name not in full or not t.is_floating_point() or name not in offsets:
                continue
            label = t.detach().long().flatten() - offsets[name]  # 1-based in its own tensor, else foreign
            inside = (label >= 1) & (label <= full[name].numel())
            self._source[name] = torch.where(inside, label - 1, torch.full_like(label, -1)).to(full[name].device)
        parameters = dict(self.model.named_parameters())
        for name, index in self._source.items():
            if name in parameters and parameters[name].requires_grad:
                held = (index < 0).view(parameters[name].shape)
                if held.any():
                    self._held[name] = held
                    parameters[name].register_hook(_zeroing(held.to(parameters[name].device)))
        if optimizer is not None:
            self._rewire(optimizer)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the slim network's values into the full network at the entries they came from; the rest
        (the dropped units) stays as it was at the freeze."""
        full = self.full.state_dict(keep_vars=True)
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name not in full:
                continue
            index = self._source.get(name)
            if index is None:  # an integer buffer (num_batches_tracked) or a tensor slimming left whole
                if t.shape == full[name].shape:
                    full[name].copy_(t)
                continue
            has = index >= 0
            full[name].view(-1)[index[has]] = t.detach().reshape(-1)[has].to(full[name].dtype)

    def _rewire(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer``'s parameters replaced by the slim network's of the same name, its per-parameter
        state sliced like them (zero at the held entries)."""
        names = {id(p): name for name, p in self.full.named_parameters(remove_duplicate=False)}
        slim = dict(self.model.named_parameters(remove_duplicate=False))
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                name = names.get(id(p))
                if name is None or name not in slim:
                    raise ValueError(f"optimizer: a parameter of shape {list(p.shape)} is not one of the network's "
                                     f"(build the optimizer over ed.model's parameters)")
                q = slim[name]
                state = optimizer.state.pop(p, None)
                if state:
                    optimizer.state[q] = {key: self._slice(name, value, p, q) for key, value in state.items()}
                params.append(q)
            group["params"] = params

    def _slice(self, name: str, value, full_param: Tensor, slim_param: Tensor):
        """One tensor of a parameter's optimiser state, cut like the parameter (others as they are)."""
        if not isinstance(value, Tensor) or value.shape != full_param.shape:
            return value
        index = self._source.get(name)
        if index is None:
            return value.clone()
        has = (index >= 0).view(slim_param.shape)
        sliced = value.reshape(-1)[index.clamp_min(0)].view(slim_param.shape).clone()
        return sliced.masked_fill_(~has, 0)


def _zeroing(held: Tensor):
    keep = (~held).to(torch.get_default_dtype())
    return lambda grad: grad * keep.to(grad.dtype)


def _tensors(model: nn.Module):
    """The floating point parameters and buffers of ``model`` by state_dict name, in order."""
    return [(name, t) for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()]


def _offsets(model: nn.Module) -> Dict[str, int]:
    """Per floating point tensor, the label before its first entry: labels are unique across the model."""
    offsets, total = {}, 0
    seen = {}
    for name, t in _tensors(model):
        key = (t.data_ptr(), t.shape) if t.numel() else None
        if key in seen:  # a tied tensor: the same labels
            offsets[name] = seen[key]
            continue
        offsets[name] = total
        if key is not None:
            seen[key] = total
        total += t.numel()
    if total >= 2**53:
        raise ValueError(f"model: {total} entries are too many to track through slimming (2^53 at most)")
    return offsets


def _labelled_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (without masks) whose floating point entries hold their label, float64: the
    offset of their tensor plus their 1-based position in it."""
    offsets = _offsets(model)
    copy_ = _copy_without_hooks(model)
    with torch.no_grad():
        for name, t in _tensors(copy_):
            module_name, _, leaf = name.rpartition(".")
            module = copy_.get_submodule(module_name) if module_name else copy_
            labels = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device).view(t.shape) + offsets[name]
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(labels, requires_grad=t.requires_grad)
            else:
                module._buffers[leaf] = labels
    return copy_
