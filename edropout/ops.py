"""The EDropout kernels, the documented Python face of ``torch.ops.edropout``.

States are ``uint8`` tensors of 0/1 with shape ``[K, D]``: K candidate states (the population) over D
units, 1 = keep the unit. Every op runs on CPU and, when the package was built with CUDA, on CUDA; all
tensors of one call must be on the same device. Plain-PyTorch references of every op, used by the tests,
live in :mod:`edropout.reference`.

=================  ==============================================================================
op                 what it computes
=================  ==============================================================================
``ising_energy``   E(σ) = −Σ_i h_i σ_i − ½ Σ_l Σ_{i≠j in block l} J^l_ij σ_i σ_j, σ = 2s − 1
``evolve``         one generation of evolution (rule ``"classic"`` or ``"edropout"``): the trial population
``select``         greedy one-to-one selection of trials against their parents, and the best index
``evolve_step``    ``evolve`` → ``ising_energy`` of the trials → ``select``, fused
=================  ==============================================================================

Couplings are block-diagonal, one block per layer, the blocks covering the units in order; a block is
dense (J, n × n) or factored (:class:`Factored` W, n × r, J = −W Wᵀ). They are packed once into a
:class:`Couplings` (one float32 buffer, the block sizes and ranks) and passed to every call, so no D×D
matrix ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Couplings", "Factored", "RULES", "ising_energy", "evolve", "select", "evolve_step"]

RULES = ("classic", "edropout")  # the mutation rules of evolve and evolve_step (their `rule` argument)


class Factored(NamedTuple):
    """A coupling block given by a factor: J = −W Wᵀ, W of shape ``[n, r]`` (scale W by √β for J = −β W Wᵀ).

    Storing W takes n·r values instead of n², which pays when n > r, e.g. a Linear layer whose input
    features (n) outnumber its outputs (r): AlexNet's first Linear has n = 9216 inputs and r = 4096 outputs.
    """

    weights: Tensor


@dataclass(frozen=True)
class Couplings:
    """Block-diagonal couplings packed for the kernels, one block per layer, in unit order.

    ``values`` holds every block's entries one block after the other, row-major (float32): a dense block
    J (n_l × n_l) or a factored block W (n_l × r_l, J = −W Wᵀ). ``sizes`` holds the n_l (their sum is D)
    and ``ranks`` the r_l, 0 for a dense block. Diagonal entries of J are ignored.
    Build one with :meth:`from_blocks` and reuse it: packing copies every block.
    """

    values: Tensor
    sizes: Tuple[int, ...]
    ranks: Tuple[int, ...]

    @classmethod
    def from_blocks(cls, blocks: Sequence[Union[Tensor, Factored]]) -> "Couplings":
        """Pack blocks, each a square tensor ``[n, n]`` or a :class:`Factored` ``[n, r]`` (any float dtype,
        one device), into one float32 buffer."""
        if isinstance(blocks, Tensor) or not isinstance(blocks, Sequence) or len(blocks) == 0:
            raise ValueError("blocks must be a non-empty sequence of square 2-D tensors or Factored, one per layer")
        flat, sizes, ranks = [], [], []
        for l, block in enumerate(blocks):
            factored = isinstance(block, Factored)
            t = block.weights if factored else block
            name = f"blocks[{l}]" + (".weights" if factored else "")
            if not isinstance(t, Tensor) or t.dim() != 2 or (not factored and t.shape[0] != t.shape[1]):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                expected = "a 2-D tensor [n, r]" if factored else "a square 2-D tensor [n, n] or Factored"
                raise ValueError(f"{name} must be {expected}, got {shape}")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
            first = blocks[0].weights if isinstance(blocks[0], Factored) else blocks[0]
            if t.device != first.device:
                raise ValueError(f"{name} must be on {first.device} like blocks[0], got {t.device}")
            if factored and (t.shape[0] == 0 or t.shape[1] == 0):
                raise ValueError(f"{name} must have at least one row and one column, got {tuple(t.shape)}")
            flat.append(t.reshape(-1).to(torch.float32))
            sizes.append(int(t.shape[0]))
            ranks.append(int(t.shape[1]) if factored else 0)
        return cls(torch.cat(flat), tuple(sizes), tuple(ranks))

    @property
    def num_units(self) -> int:
        return sum(self.sizes)

    def blocks(self) -> list:
        """The blocks as views of ``values``: ``[n_l, n_l]`` tensors and :class:`Factored` ``[n_l, r_l]``."""
        out, offset = [], 0
        for n, r in zip(self.sizes, self.ranks):
            width = r if r else n
            view = self.values[offset : offset + n * width].view(n, width)
            out.append(Factored(view) if r else view)
            offset += n * width
        return out

    def to(self, device: Union[str, torch.device]) -> "Couplings":
        return Couplings(self.values.to(device), self.sizes, self.ranks)


BlocksLike = Union[Couplings, Sequence[Union[Tensor, Factored]]]


def as_couplings(blocks: BlocksLike) -> Couplings:
    return blocks if isinstance(blocks, Couplings) else Couplings.from_blocks(blocks)


def ising_energy(states: Tensor, field: Tensor, blocks: BlocksLike) -> Tensor:
    """Ising energy of each state.

    Args:
        states: uint8 ``[K, D]`` of 0/1.
        field: float32 ``[D]``, the fields h_i.
        blocks: a :class:`Couplings`, or a list of blocks (square tensors ``[n_l, n_l]`` or
            :class:`Factored`), packed on every call.

    Returns:
        float32 ``[K]``: E = −Σ_i h_i σ_i − ½ Σ_l Σ_{i≠j in block l} J^l_ij σ_i σ_j with σ = 2·states − 1,
        accumulated in float64 per row of couplings.
    """
    c = as_couplings(blocks)
    return torch.ops.edropout.ising_energy.default(states, field, c.values, list(c.sizes), list(c.ranks))


def evolve(
    population: Tensor,
    seed: int,
    step: int,
    mutation: float = 0.1,
    crossover: float = 0.9,
    keep: Optional[Tensor] = None,
    rule: str = "classic",
) -> Tensor:
    """One generation of evolution; returns the trial population (uint8 ``[K, D]``).

    For member k, three distinct members r1, r2, r3, all ≠ k, are drawn (so K ≥ 4). Per unit d, m_d is
    true with probability ``mutation``; then, by ``rule``:

    * ``"classic"`` (binary differential evolution): the mutant is v_d = 1 − x_{r1,d} where m_d and
      x_{r2,d} ≠ x_{r3,d}, else x_{r1,d}; the trial takes u_d = v_d with probability ``crossover`` and
      always at one random unit d_k, else x_{k,d}. Where the donors agree nothing flips: a population of
      identical rows gives trials equal to their parents.
    * ``"edropout"`` (the rule of the EDropout paper's reference code): where m_d, the mutant is
      v_d = 1 − x_{r1,d} if x_{r2,d} = x_{r3,d} and 0 if they differ; elsewhere v_d = x_{r1,d}. The trial
      takes v_d with probability ``crossover``, else x_{k,d}; no unit is forced. Identical rows give
      trials that differ from their parent in about ``mutation`` × ``crossover`` of the units.

    Units flagged in ``keep`` (bool ``[D]``) are 1 in every trial.

    The random numbers come from Philox4x32-10 keyed by ``(seed, step)`` (both taken as 64-bit words), the
    same words under both rules: the same arguments give the same trials on every call, bit for bit the
    same on CPU and CUDA.
    """
    return torch.ops.edropout.evolve.default(population, seed, step, mutation, crossover, keep, rule)


def select(
    population: Tensor, energies: Tensor, trials: Tensor, trial_energies: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Greedy one-to-one selection.

    A trial replaces its parent only if its energy is strictly lower (a tie keeps the parent); a trial
    with a NaN energy never wins and a parent with a NaN energy loses to any trial with a number.

    Returns:
        ``(population, energies, best_index)``: the new population (uint8 ``[K, D]``), its energies
        (float32 ``[K]``) and the index of the lowest energy (int64 scalar tensor, the first on ties,
        never a NaN one; −1 only when every energy is NaN).
    """
    return torch.ops.edropout.select.default(population, energies, trials, trial_energies)


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
) -> Tuple[Tensor, Tensor, Tensor]:
    """One training step of the population in one call: ``evolve`` (under ``rule``) → ``ising_energy`` of
    the trials → ``select``. Same arguments and results as the three ops in turn (``energies`` are the
    population's current energies); on CUDA it runs in four kernel launches (five with factored blocks) and
    does not synchronise with the host after its argument checks."""
    c = as_couplings(blocks)
    return torch.ops.edropout.evolve_step.default(
        population, energies, field, c.values, list(c.sizes), list(c.ranks), seed, step, mutation, crossover, keep,
        rule,
    )


# Shapes of the results for FakeTensor / torch.compile tracing.
@torch.library.register_fake("edropout::ising_energy")
def _ising_energy_fake(states, field, couplings, block_sizes, block_ranks):
    return states.new_empty((states.shape[0],), dtype=torch.float32)


@torch.library.register_fake("edropout::evolve")
def _evolve_fake(population, seed, step, mutation, crossover, keep, rule="classic"):
    return torch.empty_like(population)


@torch.library.register_fake("edropout::select")
def _select_fake(population, energies, trials, trial_energies):
    return torch.empty_like(population), torch.empty_like(energies), population.new_empty((), dtype=torch.int64)


@torch.library.register_fake("edropout::evolve_step")
def _evolve_step_fake(population, energies, field, couplings, block_sizes, block_ranks, seed, step, mutation, crossover,
                      keep, rule="classic"):
    return torch.empty_like(population), torch.empty_like(energies), population.new_empty((), dtype=torch.int64)


# FLOPs of the ops from their arithmetic, for torch.utils.flop_counter.FlopCounterMode(custom_mapping=FLOPS),
# which counts a custom op as 0 otherwise. A multiply-add is 2 FLOPs, as the counter counts aten's matmuls;
# the evolution's draws and comparisons count 1 per state entry.
def _energy_flops(K: int, block_sizes, block_ranks) -> int:
    """ising_energy of K states: the field term, then per row of a dense block n entries, of a factored
    block W (n × r) the projection σᵀW and its square (2 n r + r per state)."""
    D = sum(block_sizes)
    couplings = sum(2 * n * n if r == 0 else 2 * n * r + r for n, r in zip(block_sizes, block_ranks))
    return K * (2 * D + couplings)


def _ising_energy_flops(states, field, couplings, block_sizes, block_ranks, out_shape=None) -> int:
    return _energy_flops(states[0], block_sizes, block_ranks)


def _evolve_flops(population, seed, step, mutation, crossover, keep, rule="classic", out_shape=None) -> int:
    return 4 * population[0] * population[1]  # per entry: the draws and the mutant's comparisons


def _select_flops(population, energies, trials, trial_energies, out_shape=None) -> int:
    return population[0] * (population[1] + 1)


def _evolve_step_flops(population, energies, field, couplings, block_sizes, block_ranks, seed, step, mutation,
                       crossover, keep, rule="classic", out_shape=None) -> int:
    K, D = population
    return 4 * K * D + _energy_flops(K, block_sizes, block_ranks) + K * (D + 1)


FLOPS = {torch.ops.edropout.ising_energy: _ising_energy_flops, torch.ops.edropout.evolve: _evolve_flops,
         torch.ops.edropout.select: _select_flops, torch.ops.edropout.evolve_step: _evolve_step_flops}
