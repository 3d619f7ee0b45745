import pytest
import torch

from edropout import ops, reference
from edropout.ops import Couplings
from helpers import layout, random_couplings, random_field, random_states


def assert_energies_close(out, ref, field=None, couplings=None):
    """Within 1e-5 relative of the float64 reference, plus 1e-6 of the largest |E| for energies near 0,
    or (given the terms) 1e-7 of the terms' magnitudes Σ|h_i| + ½ Σ|J_ij| (diagonal included): a float32 sum of
    many terms that nearly cancel errs in proportion to the terms, not to their sum."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    ref = ref.cpu()
    atol = 1e-6 * float(ref.abs().max())
    if field is not None:
        blocks = [(b.weights.double() @ b.weights.double().t()) if isinstance(b, ops.Factored) else b.double()
                  for b in reference.as_couplings(couplings).blocks()]
        terms = float(field.double().abs().sum()) + 0.5 * sum(float(b.abs().sum()) for b in blocks)
        atol = max(atol, 1e-7 * terms)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("factored", [0.0, 0.5], ids=["dense", "half-factored"])
@pytest.mark.parametrize("K", [1, 4, 5, 8, 13, 64])
@pytest.mark.parametrize("D,kind", [(1, "one"), (2, "one"), (7, "small"), (33, "mixed"), (257, "one"),
                                    (1000, "mixed"), (3001, "small")])
def test_matches_reference(device, gen, K, D, kind, factored):
    states = random_states(K, D, gen, p=float(torch.rand(1, generator=gen)), device=device)
    field = random_field(D, gen, device)
    couplings = random_couplings(layout(kind, D, gen), gen, device, factored=factored)
    assert_energies_close(ops.ising_energy(states, field, couplings), reference.ising_energy(states, field, couplings),
                          field, couplings)


def test_large_d_many_small_blocks(device, gen):
    D = 100_003
    states = random_states(8, D, gen, device=device)
    field = random_field(D, gen, device)
    couplings = random_couplings(layout("small", D, gen), gen, device)
    assert_energies_close(ops.ising_energy(states, field, couplings), reference.ising_energy(states, field, couplings))


def test_one_huge_block(device, gen):
    D = 3000  # one dense 3000 x 3000 block (36 MB) beside a few small ones
    sizes = [2, 1, D - 5, 2]
    states = random_states(13, D, gen, device=device)
    field = random_field(D, gen, device)
    couplings = random_couplings(sizes, gen, device)
    assert_energies_close(ops.ising_energy(states, field, couplings), reference.ising_energy(states, field, couplings))


def test_one_huge_factored_block(device, gen):
    D = 100_003  # one factored block of 100 000 units and rank 64 (25.6 MB) beside a few dense ones
    sizes, ranks = [1, D - 4, 3], [0, 64, 0]
    states = random_states(8, D, gen, device=device)
    field = random_field(D, gen, device)
    couplings = random_couplings(sizes, gen, device, ranks=ranks)
    assert couplings.ranks == (0, 64, 0)
    assert_energies_close(ops.ising_energy(states, field, couplings), reference.ising_energy(states, field, couplings))


def test_factored_equals_its_dense_block(device, gen):
    n, r = 300, 37
    W = torch.randn(n, r, generator=gen)
    states = random_states(9, n + 2, gen, device=device)
    field = random_field(n + 2, gen, device)
    extra = torch.randn(2, 2, generator=gen)
    as_factor = ops.ising_energy(states, field, [extra.to(device), ops.Factored(W.to(device))])
    as_dense = ops.ising_energy(states, field, [extra.to(device), (-W @ W.t()).to(device)])
    dense = -W.double() @ W.double().t()  # the reference on the CPU, the op's inputs wherever they are
    assert_energies_close(as_factor, reference.ising_energy(states.cpu(), field.cpu(), [extra, dense]))
    torch.testing.assert_close(as_factor, as_dense, rtol=1e-5, atol=1e-6 * float(as_dense.abs().max()))


def test_diagonal_is_ignored(device, gen):
    D = 50
    states = random_states(6, D, gen, device=device)
    field = random_field(D, gen, device)
    blocks = [torch.randn(n, n, generator=gen) for n in (20, 30)]
    huge_diagonal = [b + torch.diag(torch.randn(b.shape[0], generator=gen) * 1e6) for b in blocks]
    plain = ops.ising_energy(states, field, [b.to(device) for b in blocks])
    shifted = ops.ising_energy(states, field, [b.to(device) for b in huge_diagonal])
    torch.testing.assert_close(shifted, plain, rtol=1e-6, atol=1e-5)


def test_known_values():
    # Two units in one block: E = -(h0 s0 + h1 s1) - J01 s0 s1 (the pair i != j counted twice, halved).
    field = torch.tensor([0.5, -2.0])
    J = torch.tensor([[9.0, 3.0], [3.0, 7.0]])
    states = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=torch.uint8)
    expected = torch.tensor([-(0.5 - 2.0) - 3.0, -(0.5 + 2.0) + 3.0, -(-0.5 - 2.0) + 3.0, -(-0.5 + 2.0) - 3.0])
    torch.testing.assert_close(ops.ising_energy(states, field, [J]), expected)


def test_non_contiguous_inputs(device, gen):
    K, D = 8, 301
    wide = random_states(K, 2 * D, gen, device=device)
    states = wide[:, ::2]
    field = random_field(2 * D, gen, device)[1::2]
    couplings = random_couplings(layout("mixed", D, gen), gen, device)
    assert not states.is_contiguous() and not field.is_contiguous()
    torch.testing.assert_close(ops.ising_energy(states, field, couplings),
                               ops.ising_energy(states.contiguous(), field.contiguous(), couplings))


def test_list_of_blocks_equals_packed(gen):
    sizes = [3, 1, 5]
    blocks = [torch.randn(n, n, generator=gen) for n in sizes]
    states = random_states(4, 9, gen)
    field = random_field(9, gen)
    blocks[1] = ops.Factored(torch.randn(1, 4, generator=gen))
    packed = Couplings.from_blocks(blocks)
    assert packed.sizes == (3, 1, 5) and packed.ranks == (0, 4, 0) and packed.num_units == 9
    unpacked = packed.blocks()
    assert torch.equal(unpacked[0], blocks[0]) and torch.equal(unpacked[2], blocks[2])
    assert isinstance(unpacked[1], ops.Factored) and torch.equal(unpacked[1].weights, blocks[1].weights)
    assert torch.equal(ops.ising_energy(states, field, blocks), ops.ising_energy(states, field, packed))


def test_deterministic(device, gen):
    D = 8000
    states = random_states(8, D, gen, device=device)
    field = random_field(D, gen, device)
    couplings = random_couplings([1000] * 7 + [999, 1], gen, device)
    first = ops.ising_energy(states, field, couplings)
    for _ in range(3):
        assert torch.equal(ops.ising_energy(states, field, couplings), first)


def test_nan_propagates(gen):
    states = random_states(4, 6, gen)
    field = random_field(6, gen)
    field[2] = float("nan")
    assert ops.ising_energy(states, field, [torch.randn(6, 6, generator=gen)]).isnan().all()


def test_opcheck(device, gen):
    states = random_states(5, 40, gen, device=device)
    field = random_field(40, gen, device)
    c = random_couplings([10, 1, 29], gen, device, ranks=[0, 3, 7])
    torch.library.opcheck(torch.ops.edropout.ising_energy.default, (states, field, c.values, list(c.sizes), list(c.ranks)))
