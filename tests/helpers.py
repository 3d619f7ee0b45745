"""Random inputs for the op tests: states, fields of mixed sign and block layouts; the benchmark scripts as
modules."""

import importlib.util
from pathlib import Path

import torch

from edropout.ops import Couplings, Factored


def random_states(K, D, gen, p=0.5, device="cpu"):
    return (torch.rand(K, D, generator=gen) < p).to(torch.uint8).to(device)


def random_field(D, gen, device="cpu"):
    return (torch.randn(D, generator=gen) * torch.rand(D, generator=gen) * 4).to(device)


def random_sizes(D, gen, max_size):
    """Block sizes in [1, max_size] summing to D."""
    sizes, left = [], D
    while left:
        n = min(left, int(torch.randint(1, max_size + 1, (1,), generator=gen)))
        sizes.append(n)
        left -= n
    return sizes


def random_couplings(sizes, gen, device="cpu", factored=0.0, ranks=None):
    """Dense random blocks; a fraction `factored` of them (or those with ranks[l] > 0) are Factored, of
    random rank in [1, 2n] unless given."""
    blocks = []
    for l, n in enumerate(sizes):
        scale = 1 + 3 * torch.rand(1, generator=gen)
        r = ranks[l] if ranks is not None else (
            int(torch.randint(1, 2 * n + 1, (1,), generator=gen)) if torch.rand(1, generator=gen) < factored else 0)
        if r:
            blocks.append(Factored((torch.randn(n, r, generator=gen) * scale / r**0.5).to(device)))
        else:
            blocks.append((torch.randn(n, n, generator=gen) * scale).to(device))
    return Couplings.from_blocks(blocks)


def layout(kind, D, gen):
    """Block sizes of a named layout over D units."""
    if kind == "one":  # one block over every unit
        return [D]
    if kind == "small":  # many small blocks, sizes 1..8
        return random_sizes(D, gen, 8)
    if kind == "mixed":  # a few blocks of very different sizes, one of size 1
        big = max(1, D // 2)
        rest = D - big
        return [big] + ([1] if rest else []) + (random_sizes(rest - 1, gen, max(1, rest // 3)) if rest > 1 else [])
    raise ValueError(kind)


def load_benchmark(name):
    """The script benchmarks/<name>.py as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
