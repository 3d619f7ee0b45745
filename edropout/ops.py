"""The EDropout kernels, the documented Python face of ``torch.ops.edropout``.

States are ``uint8`` tensors of 0/1 with shape ``[K, D]``: K candidate states (the population) over D
units, 1 = keep the unit. Every op runs on CPU and, when the package was built with CUDA, on CUDA; all
tensors of one call must be on the same device. Plain-PyTorch references of every op, used by the tests,
live in :mod:`edropout.reference`.

=================  ==============================================================================
op                 what it computes
=================  ==============================================================================
``ising_energy``   E(σ) = −Σ_i h_i σ_i − ½ Σ_l Σ_{i≠j in block l} J^l_ij σ_i σ_j, σ = 2s − 1
``evolve``         one generation of binary differential evolution: the trial population
``select``         greedy one-to-one selection of trials against their parents, and the best index
``evolve_step``    ``evolve`` → ``ising_energy`` of the trials → ``select``, fused
=================  ==============================================================================

Couplings are block-diagonal, one square block per layer, the blocks covering the units in order; they
are packed once into a :class:`Couplings` (one float32 buffer and the block sizes) and passed to every
call, so no D×D matrix ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Couplings", "ising_energy", "evolve", "select", "evolve_step"]


@dataclass(frozen=True)
class Couplings:
    """Block-diagonal couplings packed for the kernels.

    ``values`` holds every block's n_l × n_l entries, row-major, one block after the other (float32);
    ``sizes`` holds the block sizes n_l, in unit order (their sum is D). Diagonal entries are ignored.
    Build one with :meth:`from_blocks` and reuse it: packing copies every block.
    """

    values: Tensor
    sizes: Tuple[int, ...]

    @classmethod
    def from_blocks(cls, blocks: Sequence[Tensor]) -> "Couplings":
        """Pack square blocks ``[n_l, n_l]`` (any float dtype, one device) into one float32 buffer."""
        if isinstance(blocks, Tensor) or len(blocks) == 0:
            raise ValueError("blocks must be a non-empty sequence of square 2-D tensors, one per layer")
        for l, block in enumerate(blocks):
            if not isinstance(block, Tensor) or block.dim() != 2 or block.shape[0] != block.shape[1]:
                shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
                raise ValueError(f"blocks[{l}] must be a square 2-D tensor [n, n], got {shape}")
            if not block.is_floating_point():
                raise ValueError(f"blocks[{l}] must be a floating-point tensor, got {block.dtype}")
            if block.device != blocks[0].device:
                raise ValueError(f"blocks[{l}] must be on {blocks[0].device} like blocks[0], got {block.device}")
        values = torch.cat([b.reshape(-1).to(torch.float32) for b in blocks])
        return cls(values, tuple(int(b.shape[0]) for b in blocks))

    @property
    def num_units(self) -> int:
        return sum(self.sizes)

    def blocks(self) -> list:
        """The blocks as ``[n_l, n_l]`` views of ``values``."""
        out, offset = [], 0
        for n in self.sizes:
            out.append(self.values[offset : offset + n * n].view(n, n))
            offset += n * n
        return out

    def to(self, device: Union[str, torch.device]) -> "Couplings":
        return Couplings(self.values.to(device), self.sizes)


BlocksLike = Union[Couplings, Sequence[Tensor]]


def as_couplings(blocks: BlocksLike) -> Couplings:
    return blocks if isinstance(blocks, Couplings) else Couplings.from_blocks(blocks)


def ising_energy(states: Tensor, field: Tensor, blocks: BlocksLike) -> Tensor:
    """Ising energy of each state.

    Args:
        states: uint8 ``[K, D]`` of 0/1.
        field: float32 ``[D]``, the fields h_i.
        blocks: a :class:`Couplings`, or a list of square blocks ``[n_l, n_l]`` (packed on every call).

    Returns:
        float32 ``[K]``: E = −Σ_i h_i σ_i − ½ Σ_l Σ_{i≠j in block l} J^l_ij σ_i σ_j with σ = 2·states − 1,
        accumulated in float64 per row of couplings.
    """
    c = as_couplings(blocks)
    return torch.ops.edropout.ising_energy.default(states, field, c.values, list(c.sizes))


def evolve(
    population: Tensor,
    seed: int,
    step: int,
    mutation: float = 0.1,
    crossover: float = 0.9,
    keep: Optional[Tensor] = None,
) -> Tensor:
    """One generation of binary differential evolution; returns the trial population (uint8 ``[K, D]``).

    For member k, three distinct members r1, r2, r3, all ≠ k, are drawn (so K ≥ 4). The mutant is
    v_d = 1 − x_{r1,d} where x_{r2,d} ≠ x_{r3,d} with probability ``mutation``, else x_{r1,d}; the trial
    takes u_d = v_d with probability ``crossover`` and always at one random unit d_k, else x_{k,d}.
    Units flagged in ``keep`` (bool ``[D]``) are 1 in every trial.

    The random numbers come from Philox4x32-10 keyed by ``(seed, step)`` (both taken as 64-bit words):
    the same arguments give the same trials on every call, bit for bit the same on CPU and CUDA.
    """
    return torch.ops.edropout.evolve.default(population, seed, step, mutation, crossover, keep)


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
) -> Tuple[Tensor, Tensor, Tensor]:
    """One training step of the population in one call: ``evolve`` → ``ising_energy`` of the trials →
    ``select``. Same arguments and results as the three ops in turn (``energies`` are the population's
    current energies); on CUDA it runs in four kernel launches and never synchronises with the host
    after its argument checks."""
    c = as_couplings(blocks)
    return torch.ops.edropout.evolve_step.default(
        population, energies, field, c.values, list(c.sizes), seed, step, mutation, crossover, keep
    )


# Shapes of the results for FakeTensor / torch.compile tracing.
@torch.library.register_fake("edropout::ising_energy")
def _ising_energy_fake(states, field, couplings, block_sizes):
    return states.new_empty((states.shape[0],), dtype=torch.float32)


@torch.library.register_fake("edropout::evolve")
def _evolve_fake(population, seed, step, mutation, crossover, keep):
    return torch.empty_like(population)


@torch.library.register_fake("edropout::select")
def _select_fake(population, energies, trials, trial_energies):
    return torch.empty_like(population), torch.empty_like(energies), population.new_empty((), dtype=torch.int64)


@torch.library.register_fake("edropout::evolve_step")
def _evolve_step_fake(population, energies, field, couplings, block_sizes, seed, step, mutation, crossover, keep):
    return torch.empty_like(population), torch.empty_like(energies), population.new_empty((), dtype=torch.int64)
