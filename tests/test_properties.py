"""Property tests of the ops (hypothesis): shapes, block layouts, dtypes, keep masks, extreme arguments and
NaN/inf values drawn at random. Every case either matches the reference (energies: the float64 reference
within float32 rounding; evolve, select, evolve_step: bit for bit, evolve_step against the three ops in
turn) or raises a one-line ValueError naming the argument; never a crash.

CI runs the "ci" profile (deterministic, a bounded number of examples, seconds); `pytest
--hypothesis-profile=long tests/test_properties.py` searches far deeper.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import DEVICES
from edropout import ops, reference
from edropout.ops import Couplings, Factored

SPECIAL = [math.nan, math.inf, -math.inf]


def tensor_from(seed: int, shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


@st.composite
def layouts(draw, max_units=160):
    """Block sizes summing to D (single-unit blocks, D not a multiple of any tile) and ranks (0: dense)."""
    D = draw(st.integers(1, max_units))
    sizes, left = [], D
    while left:
        n = draw(st.integers(1, min(left, 70)))
        sizes.append(n)
        left -= n
    ranks = [draw(st.one_of(st.just(0), st.integers(1, 2 * n + 1))) for n in sizes]
    return sizes, ranks


@st.composite
def states_of(draw, K, D):
    p = draw(st.sampled_from([0.0, 0.5, 1.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return (torch.rand(K, D, generator=g) < p).to(torch.uint8)


def poison(t: torch.Tensor, data, name: str) -> torch.Tensor:
    """Sometimes one NaN or ±inf at a drawn position."""
    value = data.draw(st.sampled_from([None, *SPECIAL]), label=f"{name} special")
    if value is not None and t.numel():
        t = t.clone()
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1), label=f"{name} at")] = value
    return t


def one_line_error(fn, *words):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value).strip()
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def assert_energies_match(out, states, field, couplings):
    ref = reference.ising_energy(states, field, couplings)
    out = out.cpu().double()
    finite = ref.isfinite()
    # non-finite inputs: non-finite where the reference is (NaN and inf may differ by summation order)
    assert torch.equal(out.isfinite(), finite), (out, ref)
    # float32 rounding scales with the terms' magnitudes: Σ|h| + ½ Σ|J| (a factored block: (Σ_i ‖w_i‖)²)
    magnitude = float(field.double().nan_to_num(0, 0, 0).abs().sum()) + 1
    for block in couplings.blocks():
        if isinstance(block, Factored):
            magnitude += 0.5 * float(block.weights.double().nan_to_num(0, 0, 0).norm(dim=1).sum()) ** 2
        else:
            magnitude += 0.5 * float(block.double().nan_to_num(0, 0, 0).abs().sum())
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-6 * magnitude)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_ising_energy_matches_reference_or_refuses(device, data):
    sizes, ranks = data.draw(layouts(), label="layout")
    D, K = sum(sizes), data.draw(st.integers(1, 70), label="K")
    states = data.draw(states_of(K, D), label="states")
    seed = data.draw(st.integers(0, 2**31), label="values seed")
    field = poison(tensor_from(seed, D, 3.0), data, "field")
    blocks = [Factored(tensor_from(seed + l + 1, (n, r))) if r else tensor_from(seed + l + 1, (n, n))
              for l, (n, r) in enumerate(zip(sizes, ranks))]
    couplings = Couplings.from_blocks(blocks)
    couplings = Couplings(poison(couplings.values, data, "couplings"), couplings.sizes, couplings.ranks)
    if data.draw(st.booleans(), label="non-contiguous states"):
        states = states.t().contiguous().t()
    states, field = states.to(device), field.to(device)
    couplings = couplings.to(device)

    fault = data.draw(st.sampled_from([None, "states dtype", "states value", "field dtype", "field size",
                                       "block_sizes", "block_ranks", "couplings size"]), label="fault")
    args = [states, field, couplings.values, list(couplings.sizes), list(couplings.ranks)]
    if fault is None:
        out = torch.ops.edropout.ising_energy(*args)
        assert out.dtype == torch.float32 and out.shape == (K,)
        assert_energies_match(out, states.cpu(), field.cpu(), couplings.to("cpu"))
        return
    word = fault.split()[0]
    if fault == "states dtype":
        args[0] = states.to(data.draw(st.sampled_from([torch.bool, torch.int64, torch.float32])))
    elif fault == "states value":
        args[0] = states.contiguous().clone()
        args[0].view(-1)[data.draw(st.integers(0, K * D - 1))] = data.draw(st.integers(2, 255))
    elif fault == "field dtype":
        args[1] = field.to(data.draw(st.sampled_from([torch.float64, torch.float16, torch.int64])))
    elif fault == "field size":
        args[1] = torch.randn(max(D + data.draw(st.sampled_from([-1, 1, 7])), 0), device=device)
    elif fault == "block_sizes":
        args[3] = list(couplings.sizes)
        args[3][data.draw(st.integers(0, len(sizes) - 1))] += data.draw(st.sampled_from([-70, -1, 1, 5]))
    elif fault == "block_ranks":
        args[4] = list(couplings.ranks) + ([0] if data.draw(st.booleans()) else [])
        if len(args[4]) == len(sizes):
            args[4][data.draw(st.integers(0, len(sizes) - 1))] = -1
    elif fault == "couplings size":
        args[2] = couplings.values[:-1]
        word = "couplings"
    if fault == "block_sizes" and sum(args[3]) == D and all(n >= 1 for n in args[3]):
        word = "couplings"  # another valid layout: the buffer no longer fits it
    one_line_error(lambda: torch.ops.edropout.ising_energy(*args), word)


@pytest.mark.parametrize("device", DEVICES)
@given(K=st.integers(1, 70), D=st.integers(1, 300), data=st.data(),
       seed=st.integers(-(2**63), 2**63 - 1), step=st.integers(0, 2**63 - 1),
       mutation=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, -0.1, 1.5, math.nan])),
       crossover=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, -1.0, 2.0])),
       rule=st.sampled_from(["classic", "edropout", "binary"]))
def test_evolve_matches_reference_or_refuses(device, K, D, data, seed, step, mutation, crossover, rule):
    population = data.draw(states_of(K, D), label="population")
    keep = data.draw(st.sampled_from([None, "mask", "wrong length", "wrong dtype"]), label="keep")
    if keep is not None:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
        mask = torch.rand(D + (keep == "wrong length"), generator=g) < 0.2
        keep = mask.to(torch.uint8) if keep == "wrong dtype" else mask
    args = (population.to(device), seed, step, mutation, crossover,
            None if keep is None else keep.to(device), rule)
    bad = [name for name, wrong in (
        ("population", K < 4), ("mutation", not 0 <= mutation <= 1), ("crossover", not 0 <= crossover <= 1),
        ("keep", keep is not None and (keep.dtype != torch.bool or keep.numel() != D)),
        ("rule", rule not in ops.RULES)) if wrong]
    if bad:
        with pytest.raises(ValueError) as info:
            ops.evolve(*args)
        message = str(info.value).strip()
        assert "\n" not in message and any(name in message for name in bad), (bad, message)
        return
    trials = ops.evolve(*args)
    assert torch.equal(trials.cpu(), reference.evolve(population, seed, step, mutation, crossover, keep, rule))


@pytest.mark.parametrize("device", DEVICES)
@given(K=st.integers(1, 40), D=st.integers(1, 50), data=st.data())
def test_select_matches_reference(device, K, D, data):
    parents, trials = data.draw(states_of(K, D)), data.draw(states_of(K, D))
    values = st.one_of(st.floats(-2.0**100, 2.0**100, width=32), st.sampled_from(SPECIAL + [0.0, -0.0]))
    energies = torch.tensor(data.draw(st.lists(values, min_size=K, max_size=K)), dtype=torch.float32)
    trial_energies = torch.tensor(data.draw(st.lists(values, min_size=K, max_size=K)), dtype=torch.float32)
    out = ops.select(parents.to(device), energies.to(device), trials.to(device), trial_energies.to(device))
    ref = reference.select(parents, energies, trials, trial_energies)
    assert torch.equal(out[0].cpu(), ref[0])
    torch.testing.assert_close(out[1].cpu(), ref[1], rtol=0, atol=0, equal_nan=True)
    assert int(out[2]) == int(ref[2])


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data(), seed=st.integers(0, 2**63 - 1), step=st.integers(0, 2**40),
       rule=st.sampled_from(["classic", "edropout"]))
def test_evolve_step_equals_the_three_ops(device, data, seed, step, rule):
    sizes, ranks = data.draw(layouts(), label="layout")
    D, K = sum(sizes), data.draw(st.integers(4, 40), label="K")
    population = data.draw(states_of(K, D), label="population").to(device)
    values_seed = data.draw(st.integers(0, 2**31))
    field = poison(tensor_from(values_seed, D, 3.0), data, "field").to(device)
    blocks = [Factored(tensor_from(values_seed + l + 1, (n, r))) if r else tensor_from(values_seed + l + 1, (n, n))
              for l, (n, r) in enumerate(zip(sizes, ranks))]
    couplings = Couplings.from_blocks(blocks).to(device)
    keep = (torch.rand(D) < 0.1).to(device) if data.draw(st.booleans(), label="keep") else None
    energies = poison(ops.ising_energy(population, field, couplings), data, "energies")

    fused = ops.evolve_step(population, energies, field, couplings, seed, step, 0.1, 0.9, keep, rule)
    trials = ops.evolve(population, seed, step, 0.1, 0.9, keep, rule)
    composed = ops.select(population, energies, trials, ops.ising_energy(trials, field, couplings))
    assert torch.equal(fused[0], composed[0])
    torch.testing.assert_close(fused[1], composed[1], rtol=0, atol=0, equal_nan=True)
    assert int(fused[2]) == int(composed[2])
