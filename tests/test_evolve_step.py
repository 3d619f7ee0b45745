import pytest
import torch

from edropout import ops, reference
from helpers import layout, random_couplings, random_field, random_states

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("K", [4, 8, 13, 64])
@pytest.mark.parametrize("D,kind", [(1, "one"), (9, "small"), (500, "mixed"), (20_001, "small")])
@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_matches_the_three_ops_and_reference(device, gen, K, D, kind, rule):
    pop = random_states(K, D, gen, device=device)
    field = random_field(D, gen, device)
    couplings = random_couplings(layout(kind, D, gen), gen, device, factored=0.3)
    keep = (torch.rand(D, generator=gen) < 0.1).to(device)
    energies = ops.ising_energy(pop, field, couplings)
    seed, step = int(torch.randint(0, 2**62, (1,), generator=gen)), int(torch.randint(0, 2**20, (1,), generator=gen))

    new_pop, new_e, best = ops.evolve_step(pop, energies, field, couplings, seed, step, 0.2, 0.8, keep, rule)

    # the same as evolve -> ising_energy -> select, op by op
    trials = ops.evolve(pop, seed, step, 0.2, 0.8, keep, rule)
    trial_e = ops.ising_energy(trials, field, couplings)
    op_pop, op_e, op_best = ops.select(pop, energies, trials, trial_e)
    assert torch.equal(new_pop, op_pop) and torch.equal(new_e, op_e) and int(best) == int(op_best)

    # and, up to float32 rounding of the energies, as the references in turn
    ref_pop, ref_e, _ = reference.evolve_step(pop, energies, field, couplings, seed, step, 0.2, 0.8, keep, rule)
    tol = 1e-6 * float(ref_e.abs().max())
    torch.testing.assert_close(new_e.cpu(), ref_e.cpu(), rtol=1e-5, atol=tol)
    assert_same_winners(new_pop, ref_pop, energies, reference.ising_energy(trials, field, couplings))


def assert_same_winners(pop_a, pop_b, parent_energies, trial_energies):
    """Populations agree except where a trial's energy ties its parent's within float32 rounding."""
    near_tie = torch.isclose(trial_energies.cpu().double(), parent_energies.cpu().double(), rtol=1e-5, atol=0)
    assert torch.equal(pop_a.cpu()[~near_tie], pop_b.cpu()[~near_tie])


def test_energies_are_those_of_the_population(device, gen):
    K, D = 8, 3000
    pop = random_states(K, D, gen, device=device)
    field = random_field(D, gen, device)
    couplings = random_couplings(layout("mixed", D, gen), gen, device)
    energies = ops.ising_energy(pop, field, couplings)
    for step in range(10):
        pop, energies, best = ops.evolve_step(pop, energies, field, couplings, 0, step)
        torch.testing.assert_close(energies, ops.ising_energy(pop, field, couplings), rtol=0, atol=0)
        assert int(best) == int(torch.argmin(energies))


@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_energy_never_rises(gen, rule):
    K, D = 8, 400
    pop = random_states(K, D, gen)
    field = random_field(D, gen)
    couplings = random_couplings([100, 300], gen)
    energies = ops.ising_energy(pop, field, couplings)
    best_so_far = energies.min()
    for step in range(200):
        pop, new_energies, best = ops.evolve_step(pop, energies, field, couplings, 42, step, rule=rule)
        assert (new_energies <= energies).all()
        assert new_energies[best] <= best_so_far
        energies, best_so_far = new_energies, new_energies[best]
    assert best_so_far < ops.ising_energy(random_states(K, D, gen), field, couplings).min()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_cpu_and_cuda_agree(gen, rule):
    K, D = 8, 30_000
    pop = random_states(K, D, gen)
    field = random_field(D, gen)
    couplings = random_couplings([64] * 400 + [D - 25_600 - 2000, 2000], gen, ranks=[0] * 400 + [0, 300])
    energies = ops.ising_energy(pop, field, couplings)
    on_cpu = ops.evolve_step(pop, energies, field, couplings, 3, 4, rule=rule)
    on_cuda = ops.evolve_step(pop.cuda(), energies.cuda(), field.cuda(), couplings.to("cuda"), 3, 4, rule=rule)
    torch.testing.assert_close(on_cuda[1].cpu(), on_cpu[1], rtol=1e-5, atol=1e-6 * float(on_cpu[1].abs().max()))
    trial_energies = reference.ising_energy(ops.evolve(pop, 3, 4, rule=rule), field, couplings)
    assert_same_winners(on_cuda[0], on_cpu[0], energies, trial_energies)


@pytest.mark.slow
def test_resnet101_layout_against_reference(device, gen):
    # The real layout (D = 54822, 105 blocks), each block stored the cheaper way, a few generations.
    import torchvision

    import edropout

    model = torchvision.models.resnet101(num_classes=102)
    blocks = []
    for layer in edropout.prunable_units(model):
        n = layer.size
        r = n if layer.always_kept else layer.kernels().shape[1]
        blocks.append(ops.Factored(torch.randn(n, r, generator=gen) / r**0.5) if r < n
                      else torch.randn(n, n, generator=gen))
    couplings = ops.Couplings.from_blocks(blocks).to(device)
    D = couplings.num_units
    field = random_field(D, gen, device)
    pop = random_states(8, D, gen, device=device)
    energies = ops.ising_energy(pop, field, couplings)
    for step in range(3):
        trials = ops.evolve(pop, 5, step)
        assert torch.equal(trials.cpu(), reference.evolve(pop, 5, step).cpu())
        trial_energies = reference.ising_energy(trials, field, couplings)
        new_pop, new_e, best = ops.evolve_step(pop, energies, field, couplings, 5, step)
        ref_pop, ref_e, _ = reference.select(pop, energies, trials, trial_energies.float())
        torch.testing.assert_close(new_e.cpu(), ref_e.cpu(), rtol=1e-5, atol=1e-6 * float(ref_e.abs().max()))
        assert_same_winners(new_pop, ref_pop, energies, trial_energies)
        pop, energies = new_pop, new_e


@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_opcheck(device, gen, rule):
    pop = random_states(4, 30, gen, device=device)
    field = random_field(30, gen, device)
    c = random_couplings([10, 20], gen, device)
    e = ops.ising_energy(pop, field, c)
    keep = (torch.rand(30, generator=gen) < 0.2).to(device)
    torch.library.opcheck(torch.ops.edropout.evolve_step.default,
                          (pop, e, field, c.values, list(c.sizes), list(c.ranks), 1, 2, 0.1, 0.9, None, rule))
    torch.library.opcheck(torch.ops.edropout.evolve_step.default,
                          (pop, e, field, c.values, list(c.sizes), list(c.ranks), 1, 2, 0.1, 0.9, keep, rule))


@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_torch_compile_traces_the_ops(gen, rule):
    pop = random_states(8, 50, gen)
    field = random_field(50, gen)
    c = random_couplings([20, 30], gen)
    e = ops.ising_energy(pop, field, c)

    def step(pop, e, s):
        return ops.evolve_step(pop, e, field, c, 7, s, rule=rule)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(pop, e, 3), step(pop, e, 3)):
        assert torch.equal(a, b)
