import pytest
import torch

from edropout import ops, reference
from helpers import random_states

nan = float("nan")


def run_both(pop, e, trials, te):
    out = ops.select(pop, e, trials, te)
    ref = reference.select(pop.cpu(), e.cpu(), trials.cpu(), te.cpu())
    assert torch.equal(out[0].cpu(), ref[0])
    torch.testing.assert_close(out[1].cpu(), ref[1], equal_nan=True, rtol=0, atol=0)
    assert out[2].dtype == torch.int64 and out[2].dim() == 0 and int(out[2]) == int(ref[2])
    return out


@pytest.mark.parametrize("K,D", [(1, 1), (4, 3), (8, 1000), (64, 5000)])
def test_matches_reference_random(device, gen, K, D):
    for _ in range(5):
        pop = random_states(K, D, gen, device=device)
        trials = random_states(K, D, gen, device=device)
        # few distinct values, so ties are common, and some NaN
        e = torch.randint(-3, 3, (K,), generator=gen).float()
        te = torch.randint(-3, 3, (K,), generator=gen).float()
        e[torch.rand(K, generator=gen) < 0.2] = nan
        te[torch.rand(K, generator=gen) < 0.2] = nan
        run_both(pop, e.to(device), trials, te.to(device))


def test_rules(device):
    pop = torch.zeros(6, 2, dtype=torch.uint8, device=device)
    trials = torch.ones(6, 2, dtype=torch.uint8, device=device)
    e = torch.tensor([1.0, 1.0, 1.0, nan, nan, -5.0], device=device)
    te = torch.tensor([0.5, 1.0, nan, 2.0, nan, -5.0], device=device)
    new_pop, new_e, best = run_both(pop, e, trials, te)
    #                 lower wins, tie keeps, NaN trial loses, NaN parent loses, both NaN, tie keeps
    assert new_pop[:, 0].tolist() == [1, 0, 0, 1, 0, 0]
    assert new_e[:3].tolist() == [0.5, 1.0, 1.0] and new_e[3] == 2.0 and new_e[4].isnan() and new_e[5] == -5.0
    assert int(best) == 5


def test_best_is_first_on_ties_and_never_nan(device):
    pop = torch.zeros(5, 3, dtype=torch.uint8, device=device)
    e = torch.tensor([nan, 2.0, -1.0, -1.0, 7.0], device=device)
    assert int(ops.select(pop, e, pop, e)[2]) == 2
    e = torch.tensor([nan, float("inf"), nan, float("inf"), nan], device=device)
    assert int(ops.select(pop, e, pop, e)[2]) == 1
    e = torch.full((5,), nan, device=device)
    assert int(ops.select(pop, e, pop, e)[2]) == -1


def test_opcheck(device, gen):
    pop, trials = random_states(5, 9, gen, device=device), random_states(5, 9, gen, device=device)
    e, te = torch.randn(5, generator=gen).to(device), torch.randn(5, generator=gen).to(device)
    torch.library.opcheck(torch.ops.edropout.select.default, (pop, e, trials, te))
