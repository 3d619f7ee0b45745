import itertools

import pytest
import torch

from edropout import ops, reference
from helpers import random_states

CUDA = torch.cuda.is_available()


def random_args(gen):
    return dict(
        seed=int(torch.randint(-(2**62), 2**62, (1,), generator=gen)),
        step=int(torch.randint(0, 2**40, (1,), generator=gen)),
        mutation=float(torch.rand(1, generator=gen)),
        crossover=float(torch.rand(1, generator=gen)),
    )


@pytest.mark.parametrize("K", [4, 5, 8, 17, 64])
@pytest.mark.parametrize("D", [1, 2, 3, 64, 999, 4096, 100_001])
def test_matches_reference_exactly(device, gen, K, D):
    population = random_states(K, D, gen, device=device)
    args = random_args(gen)
    keep = (torch.rand(D, generator=gen) < 0.1).to(device) if D > 3 else None
    trials = ops.evolve(population, keep=keep, **args)
    assert trials.dtype == torch.uint8 and trials.shape == (K, D) and trials.device == population.device
    assert torch.equal(trials.cpu(), reference.evolve(population, keep=keep, **args).cpu())


@pytest.mark.parametrize("K", [4, 5, 17, 64])
@pytest.mark.parametrize("D", [1, 3, 31, 33, 999, 8193, 100_001])  # > 8192: several CPU tasks per member
@pytest.mark.parametrize("with_keep", [False, True])
def test_edropout_rule_matches_reference_exactly(device, gen, K, D, with_keep):
    population = random_states(K, D, gen, device=device)
    args = random_args(gen)
    keep = (torch.rand(D, generator=gen) < 0.3).to(device) if with_keep else None
    trials = ops.evolve(population, keep=keep, rule="edropout", **args)
    assert trials.dtype == torch.uint8 and trials.shape == (K, D) and trials.device == population.device
    assert torch.equal(trials.cpu(), reference.evolve(population, keep=keep, rule="edropout", **args).cpu())


@pytest.mark.parametrize("rule", ["classic", "edropout"])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_probability_edges_match_reference(device, gen, p, rule):
    population = random_states(6, 500, gen, device=device)
    keep = (torch.rand(500, generator=gen) < 0.1).to(device)
    for mutation, crossover in [(p, 0.5), (0.5, p), (p, p)]:
        assert torch.equal(ops.evolve(population, 3, 4, mutation, crossover, rule=rule).cpu(),
                           reference.evolve(population, 3, 4, mutation, crossover, rule=rule).cpu())
        assert torch.equal(ops.evolve(population, 5, 6, mutation, crossover, keep, rule).cpu(),
                           reference.evolve(population, 5, 6, mutation, crossover, keep, rule).cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("K,D", [(4, 1), (8, 54822), (64, 100_003), (65, 777), (130, 4099)])
@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_cpu_and_cuda_bit_identical(gen, K, D, rule):
    population = random_states(K, D, gen)
    keep = torch.rand(D, generator=gen) < 0.05
    args = random_args(gen)
    on_cpu = ops.evolve(population, keep=keep, rule=rule, **args)
    on_cuda = ops.evolve(population.cuda(), keep=keep.cuda(), rule=rule, **args)
    assert torch.equal(on_cpu, on_cuda.cpu())


def test_same_arguments_same_trials_new_step_new_trials(device, gen):
    population = random_states(8, 5000, gen, device=device)
    first = ops.evolve(population, 11, 5)
    assert torch.equal(ops.evolve(population, 11, 5), first)
    assert not torch.equal(ops.evolve(population, 11, 6), first)
    assert not torch.equal(ops.evolve(population, 12, 5), first)


def distinct_population(K, D, gen):
    """K rows that differ pairwise in many units, so a trial row tells which rows it came from."""
    while True:
        pop = random_states(K, D, gen)
        if all((pop[a] != pop[b]).sum() > D // 4 for a, b in itertools.combinations(range(K), 2)):
            return pop


def test_donors_are_distinct_uniform_and_not_k(gen):
    # crossover = 1 with the same (seed, step): mutation = 0 gives x_r1, mutation = 1 gives
    # x_r1 XOR x_r2 XOR x_r3, so r1 and the set {r1, r2, r3} can be read off the trials.
    K, D, steps = 6, 256, 300
    pop = distinct_population(K, D, gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    counts = torch.zeros(K, K, dtype=torch.long)
    for step in range(steps):
        copies = ops.evolve(pop, seed, step, mutation=0.0, crossover=1.0)
        xors = ops.evolve(pop, seed, step, mutation=1.0, crossover=1.0)
        for k in range(K):
            r1 = [r for r in range(K) if torch.equal(copies[k], pop[r])]
            donor_sets = [set(c) for c in itertools.combinations(range(K), 3)
                          if torch.equal(xors[k], pop[c[0]] ^ pop[c[1]] ^ pop[c[2]])]
            assert len(r1) == 1 and len(donor_sets) == 1, f"member {k}: donors not recoverable"
            assert k not in donor_sets[0] and r1[0] in donor_sets[0]
            counts[k, r1[0]] += 1
    # r1 is uniform over the K - 1 other members: each count is Binomial(steps, 1/(K-1)).
    expected = steps / (K - 1)
    off_diagonal = counts[~torch.eye(K, dtype=torch.bool)].double()
    assert counts.diagonal().sum() == 0
    assert ((off_diagonal - expected).abs() < 5 * (expected * (1 - 1 / (K - 1))) ** 0.5).all(), counts


def test_mutation_flips_only_where_donors_differ(gen):
    # crossover = 1: the trial is the mutant everywhere. The same (seed, step) with mutation = 0 gives x_r1
    # and with mutation = 1 gives x_r1 XOR (x_r2 != x_r3): together they show where the donors differ.
    K, D, mutation = 8, 200_000, 0.3
    pop = random_states(K, D, gen)
    copy_r1 = ops.evolve(pop, 7, 1, mutation=0.0, crossover=1.0)
    flip_all = ops.evolve(pop, 7, 1, mutation=1.0, crossover=1.0)
    trials = ops.evolve(pop, 7, 1, mutation=mutation, crossover=1.0)
    for k in range(K):
        assert any(torch.equal(copy_r1[k], pop[r]) for r in range(K) if r != k)
        donors_differ = copy_r1[k] != flip_all[k]
        flipped = trials[k] != copy_r1[k]
        assert not flipped[~donors_differ].any()
        n = int(donors_differ.sum())
        rate = flipped[donors_differ].double().mean().item()
        assert abs(rate - mutation) < 5 * (mutation * (1 - mutation) / n) ** 0.5, (rate, n)


def test_crossover_rate_and_forced_unit(gen):
    K, D, crossover = 8, 100_000, 0.35
    pop = random_states(K, D, gen)
    # mutation = 0: the mutant is x_r1, so the trial takes x_r1 with probability `crossover` (and at d_k).
    mutant = ops.evolve(pop, 5, 9, mutation=0.0, crossover=1.0)
    trials = ops.evolve(pop, 5, 9, mutation=0.0, crossover=crossover)
    for k in range(K):
        informative = mutant[k] != pop[k]
        took = (trials[k] == mutant[k])[informative].double()
        n = took.numel()
        assert abs(took.mean().item() - crossover) < 5 * (crossover * (1 - crossover) / n) ** 0.5
        assert ((trials[k] == mutant[k]) | (trials[k] == pop[k])).all()


def test_forced_unit_always_crosses_and_is_uniform(gen):
    # crossover = 0: the trial equals its parent except at the forced unit, which takes the mutant's bit.
    K, D, steps = 4, 10, 4000
    pop = torch.tensor([[0] * D, [1] * D, [0] * D, [1] * D], dtype=torch.uint8)  # x_r1 != x_k for some pairs
    hits = torch.zeros(D)
    for step in range(steps):
        trials = ops.evolve(pop, 99, step, mutation=0.0, crossover=0.0)
        diff = trials != pop
        assert (diff.sum(dim=1) <= 1).all()
        hits += diff.sum(dim=0)
    # member k differs from x_r1 with probability 2/3 (two of its three donors are the other pattern)
    expected = steps * K * (2 / 3) / D
    assert ((hits - expected).abs() < 5 * expected**0.5).all(), hits


def test_keep_units_are_always_one(device, gen):
    K, D = 16, 3000
    pop = random_states(K, D, gen, p=0.1, device=device)
    keep = (torch.rand(D, generator=gen) < 0.2).to(device)
    for step in range(5):
        trials = ops.evolve(pop, 1, step, mutation=0.9, crossover=0.9, keep=keep)
        assert (trials[:, keep] == 1).all()
        assert ((trials == 0) | (trials == 1)).all()


def test_non_contiguous_population(device, gen):
    wide = random_states(8, 600, gen, device=device)
    pop = wide[:, 1::2]
    assert not pop.is_contiguous()
    assert torch.equal(ops.evolve(pop, 2, 3), ops.evolve(pop.contiguous(), 2, 3))


@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_opcheck(device, gen, rule):
    pop = random_states(6, 77, gen, device=device)
    keep = (torch.rand(77, generator=gen) < 0.3).to(device)
    torch.library.opcheck(torch.ops.edropout.evolve.default, (pop, 5, 6, 0.1, 0.9, keep, rule))
    torch.library.opcheck(torch.ops.edropout.evolve.default, (pop, 5, 6, 0.1, 0.9, None, rule))


def test_rule_defaults_to_classic(gen):
    pop = random_states(6, 300, gen)
    classic = ops.evolve(pop, 8, 9, 0.4, 0.6, rule="classic")
    assert torch.equal(ops.evolve(pop, 8, 9, 0.4, 0.6), classic)
    assert torch.equal(torch.ops.edropout.evolve.default(pop, 8, 9, 0.4, 0.6, None), classic)  # schema default
    assert not torch.equal(ops.evolve(pop, 8, 9, 0.4, 0.6, rule="edropout"), classic)


def binomial_bound(n, p, sigmas=5):
    return sigmas * (n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("mutation,crossover", [(0.1, 0.9), (0.35, 0.6), (1.0, 0.5)])
def test_identical_rows_edropout_flips_mutation_times_crossover(device, gen, mutation, crossover):
    # Identical rows: every donor agrees, so the edropout rule flips x_r1 = x_k where the mutation and the
    # crossover draws both hit, nowhere else; classic flips nothing (its forced unit takes x_r1 = x_k).
    K, D = 8, 60_000
    keep = torch.rand(D, generator=gen) < 0.1
    row = random_states(1, D, gen) | keep.to(torch.uint8)  # as in the controller: kept units are 1
    pop, keep = row.expand(K, D).contiguous().to(device), keep.to(device)
    seed, step = int(torch.randint(0, 2**62, (1,), generator=gen)), int(torch.randint(0, 2**20, (1,), generator=gen))
    trials = ops.evolve(pop, seed, step, mutation, crossover, keep, rule="edropout")
    changed = trials != pop
    assert not changed[:, keep].any()
    n, p = K * int((~keep).sum()), mutation * crossover
    assert abs(int(changed.sum()) - n * p) < binomial_bound(n, p), (int(changed.sum()), n * p)
    for k in range(K):  # each trial on its own, too
        n_k = int((~keep).sum())
        assert abs(int(changed[k].sum()) - n_k * p) < binomial_bound(n_k, p)
    assert torch.equal(ops.evolve(pop, seed, step, mutation, crossover, keep), pop)
    assert torch.equal(ops.evolve(pop, seed, step, mutation, crossover), pop)


def test_edropout_mutant_where_donors_agree_and_differ(device, gen):
    # crossover = 1: the trial is the mutant everywhere. mutation = 0 gives x_r1 under both rules; classic
    # with mutation = 1 gives x_r1 XOR (x_r2 != x_r3), which shows where the donors differ. The edropout rule
    # with mutation = 1 must give 0 there and 1 - x_r1 where they agree: the same donors, the other mutant.
    K, D = 9, 5000
    pop = random_states(K, D, gen, device=device)
    copy_r1 = ops.evolve(pop, 4, 2, mutation=0.0, crossover=1.0)
    assert torch.equal(ops.evolve(pop, 4, 2, mutation=0.0, crossover=1.0, rule="edropout"), copy_r1)
    donors_differ = ops.evolve(pop, 4, 2, mutation=1.0, crossover=1.0) != copy_r1
    mutants = ops.evolve(pop, 4, 2, mutation=1.0, crossover=1.0, rule="edropout")
    assert torch.equal(mutants, torch.where(donors_differ, 0, 1 - copy_r1).to(torch.uint8))


def test_edropout_rule_forces_no_unit(device, gen):
    # crossover = 0: classic still takes the mutant at one forced unit per member, the edropout rule nowhere.
    pop = random_states(8, 3000, gen, device=device)
    for step in range(5):
        assert torch.equal(ops.evolve(pop, 21, step, mutation=0.7, crossover=0.0, rule="edropout"), pop)
        assert ((ops.evolve(pop, 21, step, mutation=0.7, crossover=0.0) != pop).sum(dim=1) <= 1).all()


def test_rules_share_the_crossover_words(device, gen):
    # mutation = 0: both rules take x_r1 where the same crossover draws hit; classic also at its forced unit.
    K, D = 8, 4000
    pop = random_states(K, D, gen, device=device)
    crossover = float(torch.rand(1, generator=gen))
    classic = ops.evolve(pop, 13, 3, mutation=0.0, crossover=crossover)
    edropout_rule = ops.evolve(pop, 13, 3, mutation=0.0, crossover=crossover, rule="edropout")
    assert ((classic != edropout_rule).sum(dim=1) <= 1).all()
