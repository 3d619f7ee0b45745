"""Early-Bird tickets (You et al., ICLR 2020), the published method closest to EDropout's "search early,
then train pruned", as a control: :class:`EarlyBird` drives an :class:`~edropout.EDropout` controller in
place of its evolutionary search.

As the authors' code (GATECH-EIC/Early-Bird-Tickets) does it:

* network slimming's L1 penalty on every BatchNorm2d scale γ: ``γ.grad += strength · sign(γ)`` between
  the backward pass and the optimiser's step (:func:`batchnorm_l1_`), strength 1e-4, kept on after the
  ticket as their retraining scripts keep it (``--sparsity-regularization``);
* a channel mask from one global threshold on |γ| over the BatchNorm2d channels;
* the ticket once the newest mask differs from each of the 4 before it in at most 0.1 of the channels
  (the normalised Hamming distance; :class:`~edropout.FreezeRule` with distance 0.1 and window 5).

Adapted to EDropout's units and schedules: a mask every ``FreezeRule.every`` steps instead of every epoch
(so that it can fire within a short run), the search's masks keep a fixed fraction of the channels (their
``percent``), and the ticket itself keeps the channels of largest |γ| whose kept parameters come closest to
a target (so that it is compared at a given size without tuning runs). Units without a BatchNorm (a Linear
layer's inputs, attention heads) are not pruned by it; every layer keeps at least one channel (their
``resprune.py``). The ticket's weights train on (their README's "finetune EB tickets"; their CIFAR
retraining script re-initialises them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .controller import EDropout
from .criteria import matching_parameters
from .graph import conv_batchnorm_pairs
from .slim import kept_parameters

__all__ = ["EarlyBird", "batchnorm_l1_"]

STRENGTH = 1e-4  # the authors' default --s


@torch.no_grad()
def batchnorm_l1_(model: nn.Module, strength: float = STRENGTH) -> None:
    """Add the L1 penalty's subgradient ``strength · sign(γ)`` to the gradient of every BatchNorm2d scale
    of ``model`` (after ``backward``, before the optimiser's step). A γ held at zero gets none."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine and m.weight.grad is not None:
            m.weight.grad.add_(torch.sign(m.weight), alpha=strength)


class EarlyBird:
    """Early-Bird's search over the conv channels of ``ed`` (a controller that has not frozen; its applied
    state is left as it is, every unit kept) until its rule settles or its deadline comes; then ``ed`` is
    frozen with the ticket. ``like``: the state (bool [D]) whose size it matches: each mask of the search
    keeps as large a fraction of the BatchNorm channels as ``like`` does, and the ticket's kept parameters
    come closest to ``like``'s.

    Call :meth:`step` after each optimiser step and :meth:`end_epoch` at each epoch's end (and
    :func:`batchnorm_l1_` before each optimiser step). Its record (the rule's masks, the steps) lives in
    ``ed``'s state, so a checkpoint of ``ed`` resumes it."""

    def __init__(self, ed: EDropout, like: Tensor):
        like = like.cpu().bool()
        if like.shape != (ed.units.num_units,):
            raise ValueError(f"like must be a state of shape [{ed.units.num_units}], got {list(like.shape)}")
        self.ed = ed
        self.params = kept_parameters(ed.model, like, ed.units)[1]
        pairs, modules = conv_batchnorm_pairs(ed.model), dict(ed.model.named_modules())
        self.layers = [(layer, modules[pairs[layer.name]]) for layer in ed.units
                       if layer.kind == "conv_out" and not layer.always_kept and layer.name in pairs]
        if not self.layers:
            raise ValueError("EarlyBird: the network has no Conv2d followed by a BatchNorm2d")
        self.channels = torch.zeros(ed.units.num_units, dtype=torch.bool)  # the units it prunes
        for layer, _ in self.layers:
            self.channels[layer.start:layer.stop] = True
        self.count = int(self.channels.sum())
        self.keep = int((like & self.channels).sum())
        ed.masks.collect = False  # no energy to feed: the units' activity is not recorded

    def scales(self) -> Tensor:
        """|γ| of each unit's BatchNorm channel (float [D] on the CPU; 0 for the units it does not prune)."""
        scales = torch.zeros(self.ed.units.num_units)
        for layer, bn in self.layers:
            scales[layer.start:layer.stop] = bn.weight.detach().abs().float().cpu()
        return scales

    def mask(self, kept: int) -> Tensor:
        """bool [D]: the ``kept`` channels of largest |γ| over the whole network (each layer's largest
        among them), every unit it does not prune kept."""
        scales = self.scales()
        state = ~self.channels
        for layer, _ in self.layers:  # at least one channel per layer
            state[layer.start + int(scales[layer.start:layer.stop].argmax())] = True
        ranked = torch.sort(torch.where(self.channels & ~state, scales, torch.tensor(-1.0)), descending=True,
                            stable=True).indices
        state[ranked[: max(0, kept - len(self.layers))]] = True
        return state

    def ticket(self) -> Tensor:
        """The ticket: the mask whose kept parameters come closest to ``params``."""
        return matching_parameters(self.ed.model, self.ed.units, self.mask, self.count, self.params)

    def step(self, inputs=None, targets=None) -> None:
        """After an optimiser step: every ``every`` steps a mask, and the ticket once the masks settle."""
        ed, rule = self.ed, self.ed.freeze_rule
        if ed.frozen:
            return
        ed.steps += 1  # the controller's count of search steps (its freeze rule's records, frozen_at)
        if ed.steps % rule.every == 0 and rule.settled(ed.steps, self.mask(self.keep), self.channels):
            ed.freeze(self.ticket())

    def end_epoch(self) -> None:
        """Count an epoch; at the rule's deadline the ticket is drawn whatever the masks do."""
        ed = self.ed
        ed.end_epoch(self.ticket() if not ed.frozen and ed.freeze_rule.due(ed.epoch + 1) else None)
