"""Energies: how candidate states are scored (lower is better). Swappable objects behind one small
interface, :class:`Energy`; sums and multiples of energies are energies (``0.1 * IsingEnergy() + EnergyLoss()``).

Ising energy (the default). With σ = 2s − 1 over the units of the state,

    E(σ) = −Σ_i h_i σ_i − ½ Σ_l Σ_{i≠j in layer l} J_ij σ_i σ_j,

    h_i  = α (a_i / ā_l − 1)                  fields: a_i is unit i's activity, the running mean of
                                              mean |output| over recent training batches (sampled by
                                              every 10th training forward itself), ā_l its layer's mean;
    J_ij = −β ŵ_i · ŵ_j                       couplings: ŵ_i = w_i / ‖w_i‖, unit i's kernel (a conv
                                              output channel's weights, a Linear input's weight column).

So units more active than their layer's average want to be kept, and keeping two units with similar
kernels costs 2β cos(w_i, w_j) (a redundant pair ends with one of the two). The classifier's outputs, always
kept, have no terms. Fields and couplings are refreshed every ``refresh_every`` steps, since weights move
slowly; in between, the energy of a state does not change, so the population's energies stay valid and the
energy offers the fused kernel (``ops.evolve_step``) as its ``evolve_step``. Couplings are stored per layer the cheaper way: a
dense n×n block, or the factor √β Ŵ (n×r, r the kernel size) where r < n.

Energy loss (the released research code's score): for each candidate, the mean over a (sub-)batch of
max_{j≠y} z_j − z_y, z the logits of the network with the candidate's mask, all candidates in one batched
forward with BatchNorm's running statistics (so no candidate's score depends on the others sharing the
batch). It depends on the batch, so the controller scores the population and the trials together on the
same batch at every step.

Margin energy (the released code's score as it runs, ``MarginEnergy``): 10 × the energy loss on the whole
batch, i.e. −10 × the batch mean of the margin z_y − max_{j≠y} z_j, each candidate's BatchNorm with its own
batch statistics (as the released code's train-mode forwards, one per candidate; the running statistics
that validation uses are left untouched), and a state's energy kept from the batch on which it was scored:
only the trials are scored, against their parents' energies from earlier batches.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .units import PrunableUnits

__all__ = ["Energy", "IsingEnergy", "EnergyLoss", "MarginEnergy", "WeightedSum"]

Batch = Optional[Tuple[Tensor, Tensor]]
# (states [M, D], inputs [B, ...], batch_statistics) -> logits [M, B, classes]
CandidateLogits = Callable[..., Tensor]


class Energy:
    """Scores states: ``energy(states, batch) -> float32 [M]`` for uint8 states ``[M, D]``; lower is better.

    The controller gives an energy what it may need, and nothing more: ``attach(units, candidate_logits)``
    once (the network's :class:`~edropout.units.PrunableUnits`, whose kernels follow the weights, and
    ``candidate_logits(states, inputs, batch_statistics=False) -> [M, B, classes]``, the network's eval-mode
    logits with each of M states applied, BatchNorm with each state's own batch statistics when asked);
    ``refresh(activity)`` every ``refresh_every`` steps (the units' activity, for terms that follow the
    network). An energy whose value depends on the batch sets ``depends_on_batch = True``; the controller
    then scores the population again on each batch with the trials, unless ``rescores_parents = False``
    (a state's energy kept from when it was scored).
    An energy may offer ``evolve_step`` (evolution, scoring and selection in one op); the controller uses
    it when offered.
    """

    depends_on_batch = False
    rescores_parents = True
    refresh_every: Optional[int] = None

    def attach(self, units: PrunableUnits, candidate_logits: CandidateLogits) -> None:
        pass

    def refresh(self, activity: Tensor) -> None:
        pass

    def __call__(self, states: Tensor, batch: Batch = None) -> Tensor:
        raise NotImplementedError

    def evolve_step(self, population: Tensor, energies: Tensor, seed: int, step: int, mutation: float,
                    crossover: float, always_kept: Tensor, rule: str) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """(population, energies, best) after one generation in one op, or None where the energy offers
        no such op (the controller then evolves, scores and selects in three)."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __add__(self, other: "Energy") -> "WeightedSum":
        return WeightedSum([(1.0, self), (1.0, other)])

    def __rmul__(self, weight: float) -> "WeightedSum":
        return WeightedSum([(float(weight), self)])


class WeightedSum(Energy):
    """Σ_t w_t E_t."""

    def __init__(self, terms: Sequence[Tuple[float, Energy]]):
        self.terms: List[Tuple[float, Energy]] = []
        for weight, energy in terms:
            inner = energy.terms if isinstance(energy, WeightedSum) else [(1.0, energy)]
            self.terms += [(weight * w, e) for w, e in inner]
        self.depends_on_batch = any(e.depends_on_batch for _, e in self.terms)
        self.rescores_parents = all(e.rescores_parents for _, e in self.terms if e.depends_on_batch)
        periods = [e.refresh_every for _, e in self.terms if e.refresh_every]
        self.refresh_every = min(periods) if periods else None

    def attach(self, units, candidate_logits) -> None:
        for _, energy in self.terms:
            energy.attach(units, candidate_logits)

    def refresh(self, activity) -> None:
        for _, energy in self.terms:
            energy.refresh(activity)

    def __call__(self, states, batch=None):
        return sum(weight * energy(states, batch) for weight, energy in self.terms)

    def state_dict(self):
        return {str(i): energy.state_dict() for i, (_, energy) in enumerate(self.terms)}

    def load_state_dict(self, state):
        for i, (_, energy) in enumerate(self.terms):
            energy.load_state_dict(state[str(i)])


class IsingEnergy(Energy):
    """The Ising energy of the module docstring, evaluated by ``ops.ising_energy``."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, refresh_every: int = 10):
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive number of steps, got {refresh_every}")
        self.alpha, self.beta, self.refresh_every = float(alpha), float(beta), int(refresh_every)
        self.field: Optional[Tensor] = None
        self.couplings: Optional[ops.Couplings] = None
        self.units: Optional[PrunableUnits] = None

    def attach(self, units, candidate_logits) -> None:
        self.units = units

    def refresh(self, activity) -> None:
        field = torch.zeros_like(activity)
        blocks = []
        for layer in self.units:
            n = layer.size
            if layer.always_kept:
                blocks.append(ops.Factored(activity.new_zeros(n, 1)))
                continue
            a = activity[layer.start : layer.stop]
            mean = a.mean()
            field[layer.start : layer.stop] = self.alpha * torch.where(mean > 0, a / mean - 1, torch.zeros_like(a))
            w = layer.kernels().float()
            w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if w.shape[1] < n:
                blocks.append(ops.Factored(w * self.beta**0.5))
            else:
                blocks.append(-self.beta * (w @ w.t()))
        self.field = field
        self.couplings = ops.Couplings.from_blocks(blocks)

    def __call__(self, states, batch=None):
        return ops.ising_energy(states, self.field, self.couplings)

    def evolve_step(self, population, energies, seed, step, mutation, crossover, always_kept, rule):
        # the energy of a state does not change between refreshes: the parents' energies stay valid
        return ops.evolve_step(population, energies, self.field, self.couplings, seed, step, mutation, crossover,
                               always_kept, rule)

    def state_dict(self):  # plain data (tensors, lists), so that checkpoints load with weights_only=True
        c = self.couplings
        couplings = None if c is None else {"values": c.values, "sizes": list(c.sizes), "ranks": list(c.ranks)}
        return {"field": self.field, "couplings": couplings}

    def load_state_dict(self, state):
        c = state["couplings"]
        if isinstance(c, dict):  # older checkpoints hold an ops.Couplings itself
            c = ops.Couplings(c["values"], tuple(int(n) for n in c["sizes"]), tuple(int(r) for r in c["ranks"]))
        self.field, self.couplings = state["field"], c


class EnergyLoss(Energy):
    """The energy loss of the module docstring, on the first ``subbatch`` samples of the batch (all when
    None): a batched forward of M × subbatch samples for M states.

    The default, 8 samples, keeps the cost near a third of a training iteration at batch 128 (2K = 16
    states × 8 samples = 128 forwards without backward). Each candidate is then judged on few samples, a
    noisier score, but a trial and its parent are always judged on the same samples, so the comparison
    that selection makes is paired; pass a larger ``subbatch`` (or None) for less noise at more cost."""

    depends_on_batch = True

    def __init__(self, subbatch: Optional[int] = 8):
        if subbatch is not None and subbatch < 1:
            raise ValueError(f"subbatch must be a positive number of samples or None, got {subbatch}")
        self.subbatch = subbatch
        self.candidate_logits: Optional[CandidateLogits] = None

    def attach(self, units, candidate_logits) -> None:
        self.candidate_logits = candidate_logits

    def __call__(self, states, batch=None):
        if batch is None:
            raise ValueError("EnergyLoss needs the batch: call controller.step(inputs, targets)")
        inputs, targets = batch
        if self.subbatch is not None:
            inputs, targets = inputs[: self.subbatch], targets[: self.subbatch]
        return -margins(self.candidate_logits(states, inputs).float(), targets).mean(dim=1)


class MarginEnergy(Energy):
    """The released code's energy (module docstring): −10 × the mean margin on the whole batch, each state's
    BatchNorm with its own batch statistics, parents' energies kept from when they were scored."""

    depends_on_batch = True
    rescores_parents = False
    SCALE = 10.0  # the released code's factor (ising_cost's -10*const); it changes no comparison

    def __init__(self):
        self.candidate_logits: Optional[CandidateLogits] = None

    def attach(self, units, candidate_logits) -> None:
        self.candidate_logits = candidate_logits

    def __call__(self, states, batch=None):
        if batch is None:
            raise ValueError("MarginEnergy needs the batch: call controller.step(inputs, targets)")
        inputs, targets = batch
        logits = self.candidate_logits(states, inputs, batch_statistics=True).float()
        return -self.SCALE * margins(logits, targets).mean(dim=1)


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """z_y − max_{j≠y} z_j of logits [M, B, classes] for targets [B]: [M, B]."""
    M, B = logits.shape[:2]
    index = targets.view(1, B, 1).expand(M, B, 1)
    true = logits.gather(2, index)
    others = logits.scatter(2, index, float("-inf")).amax(dim=2, keepdim=True)
    return (true - others).squeeze(2)
