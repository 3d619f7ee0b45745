"""The EDropout controller: the one object a training loop touches.

    ed = edropout.EDropout(model)                 # units, masks, population, Ising energy
    for inputs, targets in loader:
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        ed.step(inputs, targets)                  # evolve, score, select, apply a state; may freeze
    ed.end_epoch()                                # once per epoch: the freeze rule's deadline

Each step evolves the population (``ops.evolve``: binary differential evolution, or with ``rule="edropout"``
the mutation rule of the EDropout paper's reference code), scores the trials, keeps each trial that beats
its parent (``ops.select``) and applies a state to the model as a dropout mask (``applied``: the best one by
default). An energy that offers a fused step runs the three in one op (the Ising energy, whose value only
changes when its terms are refreshed: ``ops.evolve_step``). The state freezes when its
:class:`~edropout.freezing.FreezeRule` says so (once settled, or at a deadline): dropout has become
pruning, and :func:`edropout.prune` makes the network physically slim to train on.
``stats()`` shows whether the search explores: how often the applied state changed, the population's
diversity, and the share of the units that have been applied at least once.

Other states run through the controller too, never through its masks: ``with ed.full()`` (every unit),
``with ed.applying(state)`` (a given state, e.g. a criterion's), ``ed.freeze(state)`` (prune to a given
state from now on), ``with ed.no_activity()`` (forwards that are not training, e.g. re-estimating
BatchNorm statistics), ``ed.remove()`` (the network as it was). Slimming and parameter counts are
functions of :mod:`edropout.slim` over ``ed.model``, ``ed.state`` and ``ed.units``.

Dropped units' weights are kept and get zero gradient from the loss; the optimiser's weight decay still
shrinks them (and momentum keeps moving them for a while), as for any parameter without gradient, so a
unit that comes back after a long absence starts from smaller weights.

Several processes (DistributedDataParallel, ``torchrun``): build the controller on every rank with the same
arguments, on the network or on its DDP wrapper, and call ``step`` on every rank. Every rank evolves the
same trials (the random numbers are keyed by (seed, step)); what a rank computes from its own batch, the
units' activity and a batch-dependent energy's scores, is averaged across the ranks before selection, so
every rank applies the same state (see :mod:`edropout.distributed`). In one process none of this runs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Dict, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from . import distributed, ops
from .energies import Energy, IsingEnergy
from .freezing import FreezeRule
from .graph import conv_batchnorm_pairs
from .masks import UnitMasks
from .units import prunable_units

__all__ = ["EDropout", "APPLIED", "check_arguments"]

APPLIED = ("best", "sample", "anneal")  # the state applied while the search runs


class EDropout:
    """EDropout over the prunable units of ``model`` (see :func:`edropout.prunable_units`).

    Args:
        model: any module; its parameters' device is where the population lives.
        energy: an :class:`~edropout.energies.Energy` (default: ``IsingEnergy()``).
        population: K candidate states (at least 4).
        p_init: probability that a unit is kept in the initial states (the reference implementation: 0.5).
        mutation, crossover: the evolution's probabilities (see ``ops.evolve``).
        rule: the evolution's mutation rule, ``"edropout"`` (the EDropout paper's reference code, which keeps
            a converged population exploring; the default) or ``"classic"`` (binary differential evolution,
            which stops once the population agrees); see ``ops.evolve``.
        keep_rate: a fraction of the prunable units to keep, or None to follow the energy alone. The
            initial states and every trial then keep exactly that many prunable units (rounded): a state
            with too many (too few) has randomly chosen kept (dropped) units flipped before it is scored,
            so the energy decides which units, the constraint how many.
        freeze: the :class:`~edropout.freezing.FreezeRule` (default ``FreezeRule()``: the state freezes
            only when :meth:`freeze` is called).
        applied: the state applied while the search runs: ``"best"`` (the population's best) or
            ``"sample"`` (a member drawn at each step, keyed by (seed, step); the best state is applied once
            it freezes) or ``"anneal"`` (at each step a drawn member with probability 1 - epoch / deadline,
            else the best state: dropout that settles on the state it freezes; needs the rule's deadline).
        seed: the initial states' and the evolution's random seed.
        exclude: layers (names or modules) whose units are never dropped and not part of the state.
        check_ranks: with several processes, compare a checksum of the population, its energies and the
            applied state across the ranks at every step and raise ``RanksDisagree`` when they differ (one
            small all_reduce per step; a debug mode). None: on when the environment variable
            ``EDROPOUT_CHECK_RANKS`` is 1.
    """

    def __init__(self, model: nn.Module, energy: Optional[Energy] = None, population: int = 8,
                 p_init: float = 0.5, mutation: float = 0.1, crossover: float = 0.9,
                 keep_rate: Optional[float] = None, freeze: Optional[FreezeRule] = None, seed: int = 0,
                 exclude: Iterable[Union[str, nn.Module]] = (), check_ranks: Optional[bool] = None,
                 rule: str = "edropout", applied: str = "best"):
        freeze = FreezeRule() if freeze is None else freeze
        check_arguments(population=population, p_init=p_init, mutation=mutation, crossover=crossover,
                        keep_rate=keep_rate, rule=rule, applied=applied, freeze=freeze)
        if energy is not None and not isinstance(energy, Energy):
            raise ValueError(f"energy must be an edropout.energies.Energy, got {type(energy).__name__}")

        model = distributed.unwrap(model)  # a DDP-wrapped network: its layers are the wrapped module's
        self.model = model
        self.units = prunable_units(model, exclude)
        self.masks = UnitMasks(model, self.units, conv_batchnorm_pairs(model))
        self.masks.collect = True
        device = self.masks.mask.device
        self.always_kept = self.units.always_kept(device)
        self.prunable = (~self.always_kept).float()
        self.mutation, self.crossover, self.seed = float(mutation), float(crossover), int(seed)
        self.rule = rule
        self.keep_rate = keep_rate
        self.freeze_rule = freeze
        self.applied = applied
        self.activity_every = 10  # training forwards between two samples of the units' activity
        if check_ranks is None:
            check_ranks = os.environ.get("EDROPOUT_CHECK_RANKS", "0") not in ("", "0")
        self.check_ranks = bool(check_ranks)
        self._checksum_weights: Optional[Tensor] = None

        generator = torch.Generator().manual_seed(self.seed)
        states = torch.rand(population, self.units.num_units, generator=generator) < p_init
        self.population = self._repair((states | self.always_kept.cpu()).to(torch.uint8).to(device), -1)
        self.energy = energy if energy is not None else IsingEnergy()
        self.energy.attach(self.units, self._candidate_logits)
        self.energies: Optional[Tensor] = None  # of the population, scored at the first step
        self.best = torch.zeros((), dtype=torch.long, device=device)
        self.best_state = self.masks.mask.to(torch.uint8).clone()
        # the dynamics (device counters, no sync per step): steps at which the applied state changed, and
        # the units that have been in an applied state at least once
        self.changes = torch.zeros((), dtype=torch.long, device=device)
        self.ever_kept = torch.zeros(self.units.num_units, dtype=torch.bool, device=device)
        self.steps = 0
        self.epoch = 0
        self.frozen = False
        self.frozen_at: Optional[Dict[str, int]] = None  # {"epoch": epochs ended, "step": steps} at the freeze

    # -- the training loop's calls ------------------------------------------------------------------
    def step(self, inputs: Optional[Tensor] = None, targets: Optional[Tensor] = None) -> None:
        """One generation: evolve, score, select, and apply a state (``applied``); then freeze if the
        rule says the state has settled. Pass the batch when the energy needs it (the energy loss). Does
        nothing once the state is frozen."""
        if self.frozen:
            return
        if self.steps == 0:
            self._warn_unmasked()
        batch = None if inputs is None else (inputs, targets)
        if self.energy.depends_on_batch and (inputs is None or targets is None):
            raise ValueError("step: this energy scores states on the batch; call step(inputs, targets)")
        several = distributed.active()
        with torch.no_grad():
            if several and self.masks.collect:  # the forward since the last step sampled this rank's batch
                distributed.average_across_ranks_(self.masks.activity)
            self._refresh_if_due(batch)
            K = self.population.shape[0]
            if self.energy.depends_on_batch and self.energy.rescores_parents:
                trials = self._trials()
                scores = self._scores(torch.cat([self.population, trials]), batch)
                result = ops.select(self.population, scores[:K], trials, scores[K:])
            else:  # parents keep their energies; a fused step where the energy offers one (a keep_rate
                # repairs the trials in between)
                result = None if self.keep_rate is not None else self.energy.evolve_step(
                    self.population, self.energies, self.seed, self.steps, self.mutation, self.crossover,
                    self.always_kept, self.rule)
                if result is None:
                    trials = self._trials()
                    result = ops.select(self.population, self.energies, trials, self._scores(trials, batch))
            self.population, self.energies, best = result
            self._record_best(best)
            self._apply_state(self._chosen_state())
            if several and self.check_ranks:
                self._check_ranks()
        self.steps += 1
        self.masks.collect = self.steps % self.activity_every == 0  # sample the activity of the next forward
        best_energy = None if self.energies is None else self.energies[self.best]
        if self.freeze_rule.settled(self.steps, self.masks.mask, self.prunable, best_energy):
            self.freeze()

    def end_epoch(self, state: Optional[Tensor] = None) -> None:
        """Count an epoch; freeze at the rule's deadline (the best state, or ``state`` when given)."""
        self.epoch += 1
        if not self.frozen and self.freeze_rule.due(self.epoch):
            self.freeze(state)

    def freeze(self, state: Optional[Tensor] = None) -> None:
        """Freeze the best state, or ``state`` (bool or uint8 [D]; the always-kept units kept) when given:
        from now on the model is pruned to it and ``step`` does nothing."""
        if state is not None:
            if not isinstance(state, Tensor) or state.shape != (self.units.num_units,):
                raise ValueError(f"state must be a tensor of shape [{self.units.num_units}] (one entry per unit), got "
                                 f"{list(state.shape) if isinstance(state, Tensor) else type(state).__name__}")
            self.masks.mask.copy_((state.to(self.always_kept.device).bool() | self.always_kept).to(self.masks.mask))
        elif self.energies is not None and not self.frozen:
            self._apply_state(self.best_state)
        if not self.frozen:
            self.frozen_at = {"epoch": self.epoch, "step": self.steps}
        self.frozen = True
        self.masks.collect = False

    # -- reading the state -----------------------------------------------------------------------------
    @property
    def state(self) -> Tensor:
        """The applied state, uint8 [D] (1 = keep)."""
        return self.masks.mask.to(torch.uint8)

    def stats(self) -> Dict[str, float]:
        """Best and mean population energy; ``kept``, the kept fraction of the prunable units; ``changes``,
        the steps so far at which the applied state changed; ``diversity``, the population's mean pairwise
        Hamming distance over the prunable units, as a fraction of them; ``ever_kept``, the fraction of the
        prunable units applied at least once; step; frozen."""
        energies = self.energies if self.energies is not None else torch.full((1,), float("nan"))
        units = self.prunable.sum().clamp_min(1)
        kept = float((self.masks.mask * self.prunable).sum() / units)
        ever_kept = float((self.ever_kept.float() * self.prunable).sum() / units)
        return {"best_energy": float(energies.nan_to_num(float("inf")).min()), "mean_energy": float(energies.mean()),
                "kept": kept, "changes": int(self.changes), "diversity": self.diversity(), "ever_kept": ever_kept,
                "step": self.steps, "frozen": self.frozen}

    def diversity(self) -> float:
        """Mean Hamming distance over the pairs of population members, on the prunable units, as a fraction
        of them (0: every member the same state)."""
        K = self.population.shape[0]
        ones = (self.population.float() * self.prunable).sum(dim=0)  # per unit, the members that keep it
        pairs_differing = (ones * (K - ones) * self.prunable).sum()  # summed over the units
        return float(pairs_differing / (K * (K - 1) / 2) / self.prunable.sum().clamp_min(1))

    def full(self):
        """A context within which the model runs with every unit (EDropout(F))."""
        return self._masks_set(enabled=False)

    def pruned(self):
        """A context within which the model runs with the applied (best or frozen) state (EDropout(P))."""
        return self._masks_set(enabled=True)

    @contextlib.contextmanager
    def applying(self, state: Tensor):
        """A context within which the model runs with ``state`` (bool or uint8 [D]) applied; the applied
        state is restored on exit."""
        previous = self.masks.mask.clone()
        self.masks.mask.copy_(state.to(self.masks.mask))
        try:
            with self.pruned():
                yield self.model
        finally:
            self.masks.mask.copy_(previous)

    def no_activity(self):
        """A context within which forwards record no activity of the units (forwards that are not
        training: re-estimating BatchNorm statistics, say)."""
        return self._masks_set(collect=False)

    def remove(self) -> None:
        """Take the masks off the network: it runs as if EDropout had never been attached."""
        self.masks.remove()

    @contextlib.contextmanager
    def _masks_set(self, **values):
        """Within the context, the masks' attributes ``values`` (``enabled``, ``collect``) as given."""
        previous = {name: getattr(self.masks, name) for name in values}
        for name, value in values.items():
            setattr(self.masks, name, value)
        try:
            yield self.model
        finally:
            for name, value in previous.items():
                setattr(self.masks, name, value)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"population": self.population, "energies": self.energies, "best": self.best,
                "mask": self.masks.mask, "activity": self.masks.activity,
                "steps": self.steps, "epoch": self.epoch, "frozen": self.frozen, "frozen_at": self.frozen_at,
                "seed": self.seed, "rule": self.rule, "best_state": self.best_state, "changes": self.changes,
                "ever_kept": self.ever_kept, "energy": self.energy.state_dict(),
                "freeze_rule": self.freeze_rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["population"].shape != self.population.shape:
            raise ValueError(f"state_dict: population of shape {tuple(state['population'].shape)} does not fit "
                             f"this controller's {tuple(self.population.shape)} (K, D)")
        rule = _check_rule(state.get("rule", "classic"))  # older checkpoints predate the rule: classic
        device = self.population.device
        self.population = state["population"].to(device)
        self.energies = None if state["energies"] is None else state["energies"].to(device)
        self.best = state["best"].to(device)
        self.masks.mask.copy_(state["mask"])
        self.masks.activity.copy_(state["activity"])
        self.steps, self.epoch = state["steps"], state["epoch"]
        self.frozen, self.seed = state["frozen"], state["seed"]
        self.frozen_at = state.get("frozen_at")  # older checkpoints: unknown
        self.freeze_rule.load_state_dict(state.get("freeze_rule", {}))
        self.rule = rule
        # older checkpoints predate the dynamics: the applied state stands for the best, and for the units
        # ever kept, and the count of changes starts at 0
        self.best_state = state.get("best_state", state["mask"]).to(device).to(torch.uint8)
        self.changes = state.get("changes", torch.zeros((), dtype=torch.long)).to(device)
        self.ever_kept = state.get("ever_kept", state["mask"].bool()).to(device).bool()
        self.masks.collect = not self.frozen and self.steps % self.activity_every == 0
        self.energy.load_state_dict(state["energy"])

    # -- internals --------------------------------------------------------------------------------------
    def _repair(self, states: Tensor, step: int) -> Tensor:
        """With a keep_rate, flip randomly chosen prunable units of each state until it keeps exactly
        round(keep_rate * prunable units); the choice is keyed by (seed, step)."""
        if self.keep_rate is None:
            return states
        prunable = self.prunable.bool()
        target = round(self.keep_rate * int(prunable.sum()))
        kept = states.bool()
        excess = (kept & prunable).sum(dim=1, keepdim=True) - target  # > 0: drop some; < 0: keep some
        pool = torch.where(excess > 0, kept, ~kept) & prunable
        generator = torch.Generator(states.device).manual_seed(hash((self.seed, step)) & (2**63 - 1))
        order = torch.randperm(states.shape[1], generator=generator, device=states.device)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        # in the random order, the first |excess| units of each state's pool flip
        position = pool[:, order].cumsum(dim=1)[:, rank]
        flip = pool & (position <= excess.abs())
        return states ^ flip.to(states.dtype)

    def _trials(self) -> Tensor:
        """This step's trial population (``ops.evolve``), repaired to the keep_rate."""
        trials = ops.evolve(self.population, self.seed, self.steps, self.mutation, self.crossover, self.always_kept,
                            self.rule)
        return self._repair(trials, self.steps)

    def _refresh_if_due(self, batch) -> None:
        """Refresh the energy's terms when due, and score the population where its energies are kept
        between steps: after each refresh (an energy of the network alone), or once (an energy whose
        parents are not re-scored, on this batch)."""
        period = self.energy.refresh_every
        first = self.energies is None
        if first or (period is not None and self.steps % period == 0):
            self.energy.refresh(self.masks.activity)
            if not self.energy.depends_on_batch or (first and not self.energy.rescores_parents):
                self.energies = self._scores(self.population, batch)
                if first:
                    self._record_best(torch.argmin(self.energies.nan_to_num(float("inf"))))

    def _scores(self, states: Tensor, batch) -> Tensor:
        """The energies of ``states``; on several processes, a batch-dependent energy's scores of this
        rank's batch averaged over the ranks (the global batch's)."""
        scores = self.energy(states, batch)
        if self.energy.depends_on_batch and distributed.active():
            distributed.average_across_ranks_(scores)
        return scores

    def _check_ranks(self) -> None:
        """Checksums of the population, its energies and the applied state, compared across the ranks."""
        if self._checksum_weights is None:  # a fixed random weight per unit: sum(state * weight) tells states apart
            generator = torch.Generator().manual_seed(0x5EED)
            weights = torch.randint(1, 2**31, (self.units.num_units,), generator=generator)
            self._checksum_weights = weights.to(self.population.device)
        w = self._checksum_weights
        distributed.check_same_on_all_ranks([
            ("population", (self.population.long() * w).sum(dim=1)),
            ("population's energies", self.energies.float().view(torch.int32).long()),
            ("applied state", (self.masks.mask.long() * w).sum().view(1)),
        ], self.steps)

    def _warn_unmasked(self) -> None:
        """After the first training forward: a warning naming the layers whose masks did not run (their
        units would be "dropped" without effect; exclude them)."""
        missing = self.masks.not_run()
        if missing and len(missing) == sum(1 for layer in self.units if layer.kind != "classifier_out"):
            warnings.warn("EDropout: step() before any forward of the network: call it after each training step's "
                          "forward and backward (it evolves the states on what that forward measured)", stacklevel=3)
        elif missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            warnings.warn(f"EDropout: the masks of {shown} did not run in the forward before the first step: the "
                          f"network does not call those layers through their own forward, so dropping their "
                          f"units has no effect; pass exclude=[...] to leave them out", stacklevel=3)

    def _candidate_logits(self, states: Tensor, inputs: Tensor, batch_statistics: bool = False) -> Tensor:
        """The network's logits [M, B, classes] for ``inputs`` [B, ...] with each of the M ``states``
        applied: one batched forward in eval mode, without gradients; BatchNorm with its running statistics,
        or with ``batch_statistics`` each state's own statistics of the batch (no state's logits depend on
        the others' either way)."""
        M, B = states.shape[0], inputs.shape[0]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.masks.candidates(states, batch_statistics):
                return self.model(inputs.repeat(M, *[1] * (inputs.dim() - 1))).view(M, B, -1)
        finally:
            self.model.train(was_training)

    def _record_best(self, best: Tensor) -> None:
        """Record the best member and its state."""
        best = best.clamp_min(0)  # -1 only when every energy is NaN
        self.best_state.copy_(self.population.index_select(0, best.view(1))[0])
        self.best = best

    def _chosen_state(self) -> Tensor:
        """The state applied after this step, the one place ``applied`` is decided: the best state, or for
        "sample" (always) and "anneal" (with probability 1 - epoch / deadline) a member drawn at this step."""
        if self._samples_this_step():
            return self.population[self._drawn_member()]
        return self.best_state

    def _apply_state(self, state: Tensor) -> None:
        """Mask the model with ``state``, counting a change of the applied state (after the first)."""
        state = state.to(self.masks.mask.dtype)
        changed = (state != self.masks.mask).any() & self.ever_kept.any()
        self.changes += changed
        self.ever_kept |= state.bool()
        self.masks.mask.copy_(state)

    def _samples_this_step(self) -> bool:
        """Whether a drawn member is applied at this step: always for "sample"; for "anneal" with
        probability 1 - epoch / deadline (keyed by (seed, step), the same on every rank)."""
        if self.applied != "anneal":
            return self.applied == "sample"
        generator = torch.Generator().manual_seed(hash((self.seed, self.steps, 2)) & (2**63 - 1))
        return float(torch.rand((), generator=generator)) < 1.0 - self.epoch / self.freeze_rule.deadline

    def _drawn_member(self) -> int:
        """The member applied at this step when one is drawn, the same on every rank."""
        generator = torch.Generator().manual_seed(hash((self.seed, self.steps, 1)) & (2**63 - 1))
        return int(torch.randint(self.population.shape[0], (1,), generator=generator))


def _check_rule(rule: str) -> str:
    if rule not in ops.RULES:
        raise ValueError(f"rule must be 'classic' or 'edropout', got {rule!r}")
    return rule


def check_arguments(population: int = 8, p_init: float = 0.5, mutation: float = 0.1, crossover: float = 0.9,
                    keep_rate: Optional[float] = None, rule: str = "edropout", applied: str = "best",
                    freeze: Optional[FreezeRule] = None) -> None:
    """ValueError (one line naming the argument) unless :class:`EDropout` can run with these arguments."""
    if isinstance(population, bool) or not isinstance(population, int) or population < 4:
        raise ValueError(f"population must be at least 4 candidate states, got {population!r}")
    for name, p in (("p_init", p_init), ("mutation", mutation), ("crossover", crossover)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if p_init == 0:
        raise ValueError("p_init must be in (0, 1]: with 0 every initial state drops every prunable unit")
    if keep_rate is not None and not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be a fraction in (0, 1] or None, got {keep_rate}")
    _check_rule(rule)
    if applied not in APPLIED:
        raise ValueError(f"applied must be 'best', 'sample' or 'anneal', got {applied!r}")
    if freeze is not None and not isinstance(freeze, FreezeRule):
        raise ValueError(f"freeze must be an edropout.FreezeRule, got {type(freeze).__name__}")
    if applied == "anneal" and (freeze is None or freeze.deadline is None):
        raise ValueError("applied='anneal' needs a freeze deadline (FreezeRule(deadline=...), the epoch at which "
                         "it ends)")
