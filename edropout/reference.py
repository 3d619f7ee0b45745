"""Plain-PyTorch references of the ops in :mod:`edropout.ops`.

These are the definitions the kernels are tested against: short, vectorised, and written for clarity
rather than speed. ``evolve`` re-implements the kernels' counter-based generator (Philox4x32-10) in
integer tensor arithmetic, so kernel and reference agree bit for bit; ``ising_energy`` works in float64
by default, one block at a time (no D×D matrix).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .ops import RULES, BlocksLike, Factored, as_couplings

__all__ = ["philox4x32_10", "evolve", "ising_energy", "select", "evolve_step"]

_MASK32 = 0xFFFFFFFF
_MEMBER_COUNTER = 0xFFFFFFFF  # counter word j of the per-member draws (csrc/philox.h)


def _mulhilo32(a: int, b: Tensor) -> Tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for a 32-bit constant a and int64 tensor b of 32-bit words,
    without overflowing int64: b is split into 16-bit halves."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (t >> 32) + (p_hi >> 16), t & _MASK32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> Tuple[Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcast together); returns 4 such tensors."""
    for round_ in range(10):
        if round_ > 0:
            k0 = (k0 + 0x9E3779B9) & _MASK32
            k1 = (k1 + 0xBB67AE85) & _MASK32
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _words(value: int) -> Tuple[int, int]:
    value &= 0xFFFFFFFFFFFFFFFF  # two's complement of a negative int64
    return value & _MASK32, value >> 32


def _below(w: Tensor, n: int) -> Tensor:
    return (w * n) >> 32


def _threshold(p: float) -> int:
    return int(p * 4294967296.0)


def evolve(
    population: Tensor,
    seed: int,
    step: int,
    mutation: float = 0.1,
    crossover: float = 0.9,
    keep: Optional[Tensor] = None,
    rule: str = "classic",
) -> Tensor:
    """Reference of :func:`edropout.ops.evolve` (same generator, same draws, computed on the CPU)."""
    device = population.device
    x = population.to("cpu", torch.int64)
    K, D = x.shape
    if K < 4:
        raise ValueError(f"evolve: population must have at least 4 members (rows), got K = {K}")
    if rule not in RULES:
        raise ValueError(f"evolve: rule must be 'classic' or 'edropout', got {rule!r}")
    seed_lo, seed_hi = _words(seed)
    step_lo, step_hi = _words(step)
    members = torch.arange(K)

    def draw(j: Tensor, k: Tensor) -> Tuple[Tensor, ...]:
        return philox4x32_10(j, k, torch.tensor(step_lo), torch.tensor(step_hi), seed_lo, seed_hi)

    # Donors and forced unit of each member: r1, r2, r3 uniform over the members not yet excluded.
    w = draw(torch.full((K,), _MEMBER_COUNTER), members)
    r1 = _below(w[0], K - 1)
    r1 = r1 + (r1 >= members)
    lo, hi = torch.minimum(members, r1), torch.maximum(members, r1)
    r2 = _below(w[1], K - 2)
    r2 = r2 + (r2 >= lo)
    r2 = r2 + (r2 >= hi)
    excluded = torch.sort(torch.stack([members, r1, r2], dim=1), dim=1).values
    r3 = _below(w[2], K - 3)
    for column in range(3):
        r3 = r3 + (r3 >= excluded[:, column])
    forced = _below(w[3], D)

    # Unit d of member k uses words 2*(d%2) (mutation) and 2*(d%2)+1 (crossover) of block j = d // 2.
    pairs = torch.arange((D + 1) // 2)
    unit_words = torch.stack(draw(pairs[None, :], members[:, None]), dim=2).reshape(K, -1)
    w_mutation, w_crossover = unit_words[:, 0::2][:, :D], unit_words[:, 1::2][:, :D]

    mutate = w_mutation < _threshold(mutation)
    differ = x[r2] != x[r3]
    take = w_crossover < _threshold(crossover)
    if rule == "classic":
        mutant = x[r1] ^ (mutate & differ).long()
        take = take | (torch.arange(D)[None, :] == forced[:, None])
    else:  # edropout: where mutated, 1 - x_r1 if the other donors agree, 0 if they differ; nothing forced
        mutant = torch.where(mutate, torch.where(differ, 0, 1 - x[r1]), x[r1])
    trials = torch.where(take, mutant, x)
    if keep is not None:
        trials[:, keep.to("cpu", torch.bool)] = 1
    return trials.to(device, torch.uint8)


def ising_energy(states: Tensor, field: Tensor, blocks: BlocksLike, dtype: torch.dtype = torch.float64) -> Tensor:
    """Reference of :func:`edropout.ops.ising_energy`, computed in ``dtype`` (float64 by default).

    Per block, σ_lᵀ J σ_l with J's diagonal zeroed is the coupling sum over i ≠ j; for a factored block,
    J = −W Wᵀ, it is −(‖Wᵀσ_l‖² − Σ_i ‖w_i‖²) (σ_i² = 1), NaN when a weight is not finite."""
    sigma = states.to(dtype) * 2 - 1
    energy = -(sigma @ field.to(dtype))
    start = 0
    for block in as_couplings(blocks).blocks():
        if isinstance(block, Factored):
            W = block.weights.to(dtype)
            s = sigma[:, start : start + W.shape[0]]
            pair_sum = -(((s @ W) ** 2).sum(dim=1) - (W**2).sum())
        else:
            n = block.shape[0]  # the diagonal takes no part, whatever it holds (NaN and inf too)
            J = block.to(dtype).masked_fill(torch.eye(n, dtype=torch.bool, device=block.device), 0)
            s = sigma[:, start : start + n]
            pair_sum = ((s @ J) * s).sum(dim=1)
        energy = energy - 0.5 * pair_sum
        start += s.shape[1]
    return energy


def select(
    population: Tensor, energies: Tensor, trials: Tensor, trial_energies: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`edropout.ops.select`."""
    wins = (trial_energies < energies) | (energies.isnan() & ~trial_energies.isnan())
    new_energies = torch.where(wins, trial_energies, energies)
    new_population = torch.where(wins[:, None], trials, population)
    numbered = torch.nonzero(~new_energies.isnan()).flatten()
    if numbered.numel() == 0:
        best = torch.tensor(-1, device=energies.device)
    else:
        best = numbered[torch.argmin(new_energies[numbered])]  # argmin returns the first minimum
    return new_population, new_energies, best


def evolve_step(
    population: Tensor,
    energies: Tensor,
    field: Tensor,
    blocks: BlocksLike,
    seed: int,
    step: int,
    mutation: float = 0.1,
    crossover: float = 0.9,
    keep: Optional[Tensor] = None,
    rule: str = "classic",
    dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`edropout.ops.evolve_step`: the three references in turn (energies in ``dtype``)."""
    trials = evolve(population, seed, step, mutation, crossover, keep, rule)
    trial_energies = ising_energy(trials, field, blocks, dtype).to(energies.dtype)
    return select(population, energies, trials, trial_energies)
