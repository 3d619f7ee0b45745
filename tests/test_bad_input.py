"""Bad input gives a one-line ValueError naming the argument and what was expected."""

import pytest
import torch

from edropout import ops, reference
from edropout.ops import Couplings, Factored

CUDA = torch.cuda.is_available()


def good(K=5, D=6):
    pop = (torch.rand(K, D) < 0.5).to(torch.uint8)
    field = torch.randn(D)
    blocks = [torch.randn(2, 2), torch.randn(4, 4)]
    return pop, field, Couplings.from_blocks(blocks)


def raises(fn, *words):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for word in words:
        assert word in message, message


def ising(states=None, field=None, values=None, sizes=None, ranks=None):
    pop, h, c = good()
    return torch.ops.edropout.ising_energy(
        pop if states is None else states, h if field is None else field,
        c.values if values is None else values, list(c.sizes) if sizes is None else sizes,
        list(c.ranks) if ranks is None else ranks)


@pytest.mark.parametrize("states,words", [
    (torch.ones(5, 6), ["states", "uint8"]),
    (torch.ones(30, dtype=torch.uint8), ["states", "[K, D]"]),
    (torch.ones(1, 5, 6, dtype=torch.uint8), ["states", "[K, D]"]),
    (torch.full((5, 6), 2, dtype=torch.uint8), ["states", "0 and 1"]),
    (torch.ones(0, 6, dtype=torch.uint8), ["states", "at least 1"]),
])
def test_ising_energy_states(states, words):
    raises(lambda: ising(states=states), *words)


def test_ising_energy_field_and_blocks():
    raises(lambda: ising(field=torch.randn(6, dtype=torch.float64)), "field", "Float")
    raises(lambda: ising(field=torch.randn(7)), "field", "[D]")
    raises(lambda: ising(field=torch.randn(2, 3)), "field")
    raises(lambda: ising(sizes=[2, 3]), "block_sizes", "sum to D = 6")
    raises(lambda: ising(sizes=[2, 5]), "block_sizes[1]", "fit")
    raises(lambda: ising(sizes=[0, 6]), "block_sizes[0]", "at least 1")
    raises(lambda: ising(sizes=[-2, 8]), "block_sizes[0]")
    raises(lambda: ising(ranks=[0]), "block_ranks", "one entry per block")
    raises(lambda: ising(ranks=[0, -1]), "block_ranks[1]")
    raises(lambda: ising(ranks=[0, 3]), "couplings", "16")  # the second block read as a 4 x 3 factor
    raises(lambda: ising(values=torch.randn(19)), "couplings", "20")
    raises(lambda: ising(values=torch.randn(20, dtype=torch.float64)), "couplings", "float32")
    raises(lambda: ising(values=torch.randn(4, 5)), "couplings", "1-D")


def test_couplings_from_blocks():
    raises(lambda: Couplings.from_blocks([torch.randn(2, 2), torch.randn(3, 4)]), "blocks[1]", "square")
    raises(lambda: Couplings.from_blocks([torch.randn(3)]), "blocks[0]", "square")
    raises(lambda: Couplings.from_blocks([torch.ones(2, 2, dtype=torch.long)]), "blocks[0]", "floating")
    raises(lambda: Couplings.from_blocks([]), "blocks", "non-empty")
    raises(lambda: Couplings.from_blocks(torch.randn(3, 3)), "blocks", "sequence")
    raises(lambda: Couplings.from_blocks([[1.0]]), "blocks[0]")
    raises(lambda: Couplings.from_blocks([Factored(torch.randn(3))]), "blocks[0].weights", "[n, r]")
    raises(lambda: Couplings.from_blocks([torch.randn(2, 2), Factored(torch.randn(3, 0))]), "blocks[1].weights")


def test_evolve():
    pop, _, _ = good()
    raises(lambda: ops.evolve(pop[:3], 0, 0), "population", "at least 4", "K = 3")
    raises(lambda: ops.evolve(pop.float(), 0, 0), "population", "uint8")
    raises(lambda: ops.evolve(pop * 3, 0, 0), "population", "0 and 1")
    raises(lambda: ops.evolve(pop[0], 0, 0), "population", "[K, D]")
    raises(lambda: ops.evolve(pop, 0, 0, mutation=-0.1), "mutation", "[0, 1]")
    raises(lambda: ops.evolve(pop, 0, 0, mutation=float("nan")), "mutation")
    raises(lambda: ops.evolve(pop, 0, 0, crossover=1.5), "crossover", "[0, 1]")
    raises(lambda: ops.evolve(pop, 0, 0, keep=torch.ones(6)), "keep", "Bool")
    raises(lambda: ops.evolve(pop, 0, 0, keep=torch.ones(5, dtype=torch.bool)), "keep", "[D]")
    big = torch.zeros(2049, 3, dtype=torch.uint8)
    raises(lambda: ops.evolve(big, 0, 0), "population", "at most 2048")
    for rule in ["binary", "", "Classic"]:
        raises(lambda: ops.evolve(pop, 0, 0, rule=rule), "edropout.evolve", "rule", "'classic' or 'edropout'")
    raises(lambda: ops.evolve(pop, 0, 0, rule="de"), "rule", "got 'de'")
    raises(lambda: reference.evolve(pop, 0, 0, rule="de"), "rule", "'classic' or 'edropout'", "'de'")


def test_select():
    pop, _, _ = good()
    e = torch.randn(5)
    raises(lambda: ops.select(pop, e, pop[:, :5], e), "trials", "shape")
    raises(lambda: ops.select(pop, e[:4], pop, e), "energies", "[K]")
    raises(lambda: ops.select(pop, e, pop, e.double()), "trial_energies", "Float")
    raises(lambda: ops.select(pop, e, pop * 2, e), "trials", "0 and 1")
    raises(lambda: ops.select(pop.bool(), e, pop, e), "population", "uint8")


def test_evolve_step():
    pop, h, c = good()
    e = ops.ising_energy(pop, h, c)
    raises(lambda: ops.evolve_step(pop, e[:3], h, c, 0, 0), "energies", "[K]")
    raises(lambda: ops.evolve_step(pop[:3], e[:3], h, c, 0, 0), "population", "at least 4")
    raises(lambda: ops.evolve_step(pop, e, h[:5], c, 0, 0), "field")
    raises(lambda: ops.evolve_step(pop, e, h, Couplings.from_blocks([torch.randn(6, 6), torch.randn(1, 1)]), 0, 0),
           "block_sizes")
    raises(lambda: ops.evolve_step(pop, e, h, c, 0, 0, mutation=2.0), "mutation")
    raises(lambda: ops.evolve_step(pop, e, h, c, 0, 0, rule="de"), "edropout.evolve_step", "rule",
           "'classic' or 'edropout'", "got 'de'")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_tensors_on_different_devices():
    pop, h, c = good()
    e = ops.ising_energy(pop, h, c)
    raises(lambda: ops.ising_energy(pop.cuda(), h, c.to("cuda")), "field", "cuda")
    raises(lambda: ops.ising_energy(pop.cuda(), h.cuda(), c), "couplings", "cuda")
    raises(lambda: ops.evolve(pop.cuda(), 0, 0, keep=torch.ones(6, dtype=torch.bool)), "keep", "cuda")
    raises(lambda: ops.select(pop.cuda(), e.cuda(), pop, e.cuda()), "trials", "cuda")
    raises(lambda: ops.evolve_step(pop.cuda(), e, h.cuda(), c.to("cuda"), 0, 0), "energies", "cuda")
