import collections
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import edropout
import edropout.models
from edropout import EDropout, FreezeRule, ops
from edropout.energies import EnergyLoss, IsingEnergy


class SmallCNN(nn.Module):
    """A user's network: grouped convs, BatchNorm, a Linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12 * 4 * 4, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.head(F.relu(self.fc1(x.flatten(1))))


def data(gen, n=16, classes=5):
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def train_steps(model, ed, gen, steps, optimizer=None, record=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = data(gen)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ed.step(x, y)
        if record is not None:
            record.append((ed.state.clone(), ed.energies.clone()))
    return optimizer


def random_state(ed, gen):
    """Half of the units at random, and at least one dropped and one kept unit in every layer (on the CPU)."""
    state = (torch.rand(ed.units.num_units, generator=gen) < 0.5) | ed.always_kept.cpu()
    for layer in ed.units:
        if not layer.always_kept and layer.size > 1:
            state[layer.start], state[layer.start + 1] = False, True
    return state.to(torch.uint8)


def test_user_module_works_unchanged(gen, device):
    model = SmallCNN().to(device)
    ed = EDropout(model, seed=1)
    assert ed.units.num_units == 8 + 12 + 192 + 16 + 5 and ed.population.device.type == device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        x, y = (t.to(device) for t in data(gen))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ed.step(x, y)
    stats = ed.stats()
    assert stats["step"] == 5 and 0 < stats["kept"] < 1 and stats["best_energy"] <= stats["mean_energy"]
    assert torch.equal(ed.state, ed.population[ed.best])


class KeptUnits(edropout.energies.Energy):
    """A user's energy: the number of kept units (so the search drops everything it may)."""

    def __call__(self, states, batch=None):
        return states.float().sum(dim=1)


def test_user_written_energy(gen):
    model = SmallCNN()
    ed = EDropout(model, energy=KeptUnits(), seed=2)
    initially = float(ed.population.float().sum(dim=1).min())
    train_steps(model, ed, gen, 60)
    assert float(ed.energies[ed.best]) == float(ed.state.sum()) < initially - 10
    assert ed.state[ed.always_kept].all()


@pytest.mark.parametrize("train", [True, False])
def test_dropped_channels_are_exactly_zero_after_batchnorm(gen, train, device):
    model = SmallCNN().to(device).train(train)
    ed = EDropout(model)
    seen = {}
    model.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("bn1", o))  # runs after the mask
    model.fc1.register_forward_hook(lambda m, i, o: seen.update(fc1_in=i[0], fc1_out=o))
    with torch.no_grad():
        model.bn1.bias.uniform_(1, 2)  # a bias that the old masking of conv weights would leak
        model.bn1.running_mean.uniform_(-1, 1)
    state = random_state(ed, gen).to(device)
    ed.masks.mask.copy_(state)
    model(data(gen)[0].to(device))
    dropped = state[:8] == 0
    assert dropped.any() and (seen["bn1"][:, dropped] == 0).all()
    assert (seen["bn1"][:, ~dropped] != 0).any()
    # a dropped input feature of fc1 contributes nothing: the output is that of the input with it zeroed
    fc1_kept = state[20:212].float()
    assert (fc1_kept == 0).any()
    expected = F.linear(seen["fc1_in"] * fc1_kept, model.fc1.weight, model.fc1.bias)
    torch.testing.assert_close(seen["fc1_out"], expected, rtol=1e-6, atol=1e-6)


def test_dropped_units_get_zero_gradient(gen):
    model = SmallCNN()
    ed = EDropout(model)
    state = random_state(ed, gen)
    ed.masks.mask.copy_(state)
    x, y = data(gen)
    F.cross_entropy(model(x), y).backward()
    drop1, drop2, drop_fc = state[:8] == 0, state[8:20] == 0, state[20:212] == 0
    assert (model.conv1.weight.grad[drop1] == 0).all() and (model.conv1.bias.grad[drop1] == 0).all()
    assert (model.bn1.weight.grad[drop1] == 0).all() and (model.bn1.bias.grad[drop1] == 0).all()
    assert (model.conv2.weight.grad[drop2] == 0).all() and (model.bn2.bias.grad[drop2] == 0).all()
    assert (model.fc1.weight.grad[:, drop_fc] == 0).all()
    assert (model.conv1.weight.grad[~drop1] != 0).any() and (model.fc1.weight.grad[:, ~drop_fc] != 0).any()
    # weights of dropped units are kept, not zeroed
    assert (model.conv1.weight[drop1] != 0).any()


def test_batched_candidates_equal_separate_forwards(gen, device):
    model = SmallCNN().to(device).eval()
    ed = EDropout(model)
    states = torch.stack([random_state(ed, gen) for _ in range(6)]).to(device)
    x = data(gen, n=4)[0].to(device)
    with torch.no_grad():
        with ed.masks.candidates(states):
            batched = model(x.repeat(6, 1, 1, 1)).view(6, 4, -1)
        for k in range(6):
            ed.masks.mask.copy_(states[k])
            torch.testing.assert_close(batched[k], model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["classic", "edropout"])
def test_state_dict_round_trip_reproduces_the_next_steps(gen, rule):
    model = SmallCNN()
    ed = EDropout(model, energy=IsingEnergy(refresh_every=4), seed=3, rule=rule)
    optimizer = train_steps(model, ed, gen, 6)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    saved = copy.deepcopy(ed.state_dict())
    rng = gen.get_state()
    first = []
    train_steps(model, ed, gen, 10, optimizer, first)

    model2 = SmallCNN()
    model2.load_state_dict(saved_model)
    ed2 = EDropout(model2, energy=IsingEnergy(refresh_every=4), seed=99)  # the rule comes from the state_dict
    ed2.load_state_dict(saved)
    assert ed2.rule == rule
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    optimizer2.load_state_dict(saved_opt)
    gen.set_state(rng)
    second = []
    train_steps(model2, ed2, gen, 10, optimizer2, second)
    for (s1, e1), (s2, e2) in zip(first, second):
        assert torch.equal(s1, s2) and torch.equal(e1, e2)


@pytest.mark.parametrize("keep_rate", [None, 0.4])  # the fused ops.evolve_step; ops.evolve, repair, select
def test_edropout_rule_drives_the_steps(gen, keep_rate):
    model = SmallCNN()
    ed = EDropout(model, keep_rate=keep_rate, seed=8, rule="edropout")
    assert ed.rule == "edropout"
    train_steps(model, ed, gen, 3)
    population, energies, step = ed.population.clone(), ed.energies.clone(), ed.steps
    args = (population, ed.seed, step, ed.mutation, ed.crossover, ed.always_kept)
    trials = ed._repair(ops.evolve(*args, rule="edropout"), step)
    assert not torch.equal(trials, ed._repair(ops.evolve(*args), step))  # the rule makes a difference
    expected_population, expected_energies, _ = ops.select(population, energies, trials, ed.energy(trials))
    ed.step()
    assert torch.equal(ed.population, expected_population) and torch.equal(ed.energies, expected_energies)
    train_steps(model, ed, gen, 20)
    assert ed.stats()["step"] == 24 and ed.state[ed.always_kept].all()
    assert torch.equal(ed.state, ed.population[ed.best])


def test_state_dict_without_rule_loads_as_classic():
    model = SmallCNN()
    ed = EDropout(model, rule="edropout")
    assert ed.state_dict()["rule"] == "edropout"
    older = {key: value for key, value in ed.state_dict().items() if key != "rule"}
    ed.load_state_dict(older)
    assert ed.rule == "classic"
    with pytest.raises(ValueError, match="rule"):
        ed.load_state_dict(dict(older, rule="binary"))


def test_diversity_is_the_mean_pairwise_hamming_over_the_prunable_units(gen):
    ed = EDropout(SmallCNN())
    K, D = 6, ed.units.num_units
    ed.population = ((torch.rand(K, D, generator=gen) < torch.rand(1, generator=gen)) | ed.always_kept).to(torch.uint8)
    prunable = ~ed.always_kept
    distances = [float((ed.population[i] != ed.population[j])[prunable].sum())
                 for i in range(K) for j in range(i + 1, K)]
    expected = sum(distances) / len(distances) / int(prunable.sum())
    assert ed.diversity() == pytest.approx(expected, rel=1e-6) and ed.stats()["diversity"] == ed.diversity()
    ed.population = ed.population[:1].repeat(K, 1)
    assert ed.diversity() == 0.0


@pytest.mark.parametrize("applied", ["best", "sample"])
def test_changes_and_ever_kept_follow_the_applied_states(gen, applied):
    model = SmallCNN()
    ed = EDropout(model, energy=IsingEnergy(refresh_every=3), rule="edropout", applied=applied, seed=5)
    states, bests = [], []
    for _ in range(25):
        train_steps(model, ed, gen, 1)
        states.append(ed.state.clone())
        bests.append(ed.population[ed.best].clone())
        if applied == "best":
            assert torch.equal(ed.state, bests[-1])
    changes = sum(not torch.equal(a, b) for a, b in zip(states, states[1:]))
    first_step_changes = int(ed.stats()["changes"]) - changes  # the first step may apply two states in turn
    assert 0 <= first_step_changes <= 1
    ever = torch.stack(states).bool().any(0)
    prunable = ~ed.always_kept
    assert torch.equal(ed.ever_kept | ever, ed.ever_kept)  # every applied state is in it
    assert ed.stats()["ever_kept"] == pytest.approx(float(ed.ever_kept[prunable].float().mean()))
    if applied == "sample":  # one state per step: exactly the union, exactly the counted changes
        assert torch.equal(ed.ever_kept, ever) and first_step_changes == 0
        # a member drawn per step: the applied state moves far more often than the best one
        assert changes > sum(not torch.equal(a, b) for a, b in zip(bests, bests[1:]))
        ed.freeze()
        assert torch.equal(ed.state, ed.best_state) and torch.equal(ed.state, bests[-1])


def test_anneal_draws_members_less_often_each_epoch_then_applies_the_best(gen):
    """applied="anneal": at each step a drawn member with probability 1 - epoch / deadline, else the best
    state; in the last epoch before the deadline mostly the best, after it the frozen best."""
    model = SmallCNN()
    ed = EDropout(model, energy=IsingEnergy(refresh_every=5), freeze=FreezeRule(deadline=4), rule="edropout",
                  applied="anneal", seed=3)
    off_best = []
    for epoch in range(4):
        count = 0
        for _ in range(30):
            train_steps(model, ed, gen, 1)
            count += not torch.equal(ed.state, ed.best_state)
        off_best.append(count)
        ed.end_epoch()
    # the drawn member is the best one about 1/8 of the time: expected 26, 20, 13, 7 of 30 steps off the best
    assert off_best[0] > off_best[3] and off_best[0] >= 15 and off_best[3] <= 14, off_best
    assert ed.frozen and torch.equal(ed.state, ed.best_state)
    with pytest.raises(ValueError, match="deadline"):
        EDropout(SmallCNN(), applied="anneal", freeze=FreezeRule(deadline=None))


def test_the_deadline_freezes_at_the_end_of_that_epoch(gen):
    model = SmallCNN()
    ed = EDropout(model, freeze=FreezeRule(deadline=2), rule="edropout", applied="sample")
    train_steps(model, ed, gen, 4)
    ed.end_epoch()
    assert not ed.frozen
    train_steps(model, ed, gen, 4)
    ed.end_epoch()
    assert ed.frozen and torch.equal(ed.state, ed.population[ed.best])
    assert ed.frozen_at == {"epoch": 2, "step": 8}
    state, changes = ed.state.clone(), ed.stats()["changes"]
    train_steps(model, ed, gen, 3)
    assert torch.equal(ed.state, state) and ed.stats()["changes"] == changes


def test_state_dict_carries_the_dynamics_and_loads_older_ones(gen):
    model = SmallCNN()
    ed = EDropout(model, rule="edropout", applied="sample", seed=2)
    train_steps(model, ed, gen, 8)
    saved = copy.deepcopy(ed.state_dict())
    ed2 = EDropout(SmallCNN(), rule="edropout", applied="sample", seed=2)
    ed2.load_state_dict(saved)
    for key in ("changes", "ever_kept", "best_state"):
        assert torch.equal(getattr(ed2, key), getattr(ed, key))
    older = {k: v for k, v in saved.items() if k not in ("changes", "ever_kept", "best_state")}
    ed2.load_state_dict(older)
    assert int(ed2.changes) == 0 and torch.equal(ed2.ever_kept, saved["mask"].bool())
    assert torch.equal(ed2.best_state, saved["mask"].to(torch.uint8))


def test_dead_kernel_dropped_and_duplicate_pair_keeps_one(gen):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    # kernel 0 dead, kernels 1 and 2 identical, the others orthogonal to them and to each other
    q, _ = torch.linalg.qr(torch.randn(27, 27, generator=gen))
    kernels = torch.stack([torch.zeros(27), q[:, 0], q[:, 0], q[:, 1], q[:, 2], q[:, 3]])
    with torch.no_grad():
        model[0].weight.copy_(kernels.view(6, 3, 3, 3))
        model[0].bias.zero_()
    # 16 candidates: with 8 and only 15 units the population can agree on a bit before finding its best
    ed = EDropout(model, energy=IsingEnergy(beta=2.0, refresh_every=5), population=16, seed=5)
    for _ in range(150):
        model(torch.randn(8, 3, 8, 8, generator=gen))
        ed.step()
    state = ed.state
    assert state[0] == 0, "the dead kernel is kept"
    assert int(state[1]) + int(state[2]) == 1, "the duplicate kernels are not one kept, one dropped"


def test_freeze_rule_distance_is_the_largest_from_the_newest_of_its_window():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    D, window, every = 40, 4, 3
    prunable = torch.ones(D)
    prunable[:5] = 0  # always-kept units do not count
    rule = FreezeRule(distance=0.1, window=window, every=every)
    states = []
    for step in range(1, 25):
        state = (torch.rand(D, generator=gen) < 0.5).to(torch.uint8)
        settled = rule.settled(step, state, prunable)
        if step % every == 0:
            states.append(state.bool())
        if len(states) >= window and step % every == 0:
            newest, others = states[-1], states[-window:-1]
            expected = max(int(((o != newest) & prunable.bool()).sum()) for o in others) / 35
            assert rule.distances[-1] == pytest.approx(expected) and settled == (expected <= 0.1)
        else:
            assert not settled
    assert len(rule.distances) == len(states) - window + 1
    for bad, word in [({"distance": 0.0}, "distance"), ({"distance": 1.5}, "distance"), ({"window": 1}, "window"),
                      ({"every": 0}, "every"), ({"deadline": 0}, "deadline")]:
        with pytest.raises(ValueError, match=word):
            FreezeRule(**bad)


def test_keep_rate_is_reached(gen):
    model = SmallCNN()
    ed = EDropout(model, keep_rate=0.3, seed=2)
    train_steps(model, ed, gen, 300)
    assert abs(ed.stats()["kept"] - 0.3) <= 0.02, ed.stats()


def test_freezes_once_settled_and_contexts(gen):
    model = SmallCNN()
    ed = EDropout(model, freeze=FreezeRule(distance=0.05, window=4, every=5), rule="classic")
    for _ in range(60):
        train_steps(model, ed, gen, 5)
        if ed.frozen:
            break
    rule = ed.freeze_rule
    assert ed.frozen and rule.distances[-1] <= 0.05 and all(d > 0.05 for d in rule.distances[:-1])
    assert ed.frozen_at["step"] % 5 == 0 and ed.frozen_at["step"] >= 20
    state = ed.state.clone()
    train_steps(model, ed, gen, 3)
    assert torch.equal(ed.state, state)
    x = data(gen)[0]
    model.eval()
    with torch.no_grad():
        with ed.full():
            full = model(x)
        with ed.pruned():
            pruned = model(x)
        ed.masks.remove()
        plain = model(x)
    torch.testing.assert_close(full, plain)
    assert not torch.allclose(pruned, plain)
    R, p = edropout.kept_parameters(ed.model, ed.state, ed.units)
    total = sum(q.numel() for q in model.parameters())
    assert 0 < p < total and R == pytest.approx(100 * p / total)


def test_energy_loss_and_weighted_sum(gen):
    model = SmallCNN()
    ed = EDropout(model, energy=EnergyLoss(subbatch=8), seed=4)
    train_steps(model, ed, gen, 4)
    assert ed.energies.shape == (8,) and torch.isfinite(ed.energies).all()
    with pytest.raises(ValueError, match="step\\(inputs, targets\\)"):
        ed.step()
    model2 = SmallCNN()
    ed2 = EDropout(model2, energy=0.5 * IsingEnergy() + EnergyLoss(subbatch=8))
    train_steps(model2, ed2, gen, 4)
    assert ed2.stats()["step"] == 4


def test_bad_arguments():
    model = SmallCNN()
    for kwargs, word in [({"population": 3}, "population"), ({"p_init": 1.5}, "p_init"),
                         ({"keep_rate": 0.0}, "keep_rate"), ({"energy": "ising"}, "energy"),
                         ({"freeze": 5}, "freeze"), ({"rule": "binary"}, "rule"),
                         ({"applied": "mean"}, "applied")]:
        with pytest.raises(ValueError, match=word):
            EDropout(model, **kwargs)


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("alexnet", 224), ("squeezenet1_1", 224)])
def test_slim_equals_the_masked_model_and_kept_parameters(gen, name, size):
    model = edropout.models.build(name, 3, 10)
    ed = EDropout(model, seed=7)
    ed.masks.mask.copy_(random_state(ed, gen))
    model.eval()
    x = torch.randn(2, 3, size, size, generator=gen)
    small = edropout.slim(ed.model, ed.state, ed.units)
    with torch.no_grad():
        masked, slimmed = model(x), small(x)
    torch.testing.assert_close(slimmed, masked, rtol=1e-5, atol=1e-5 * float(masked.abs().max()))
    R, kept = edropout.kept_parameters(ed.model, ed.state, ed.units)
    slim_count = sum(p.numel() for p in small.parameters())
    assert kept <= slim_count < sum(p.numel() for p in model.parameters())
    if name != "resnet18":  # every dropped unit is removable: the slim model is exactly what is kept
        assert kept == slim_count
    else:  # channels joining residual sums are masked, not removed
        assert kept < slim_count


class _LargeOps(TorchDispatchMode):
    """Counts operations whose output has at least ``size`` elements, by name (views aside)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.counts = size, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor) and out.numel() >= self.size:
            self.counts[str(func.overloadpacket)] += 1
        return out


def test_masks_absorbed_by_batchnorm_add_no_pass_over_activations(gen):
    """ResNet-18: every masked conv is followed by a BatchNorm, which absorbs the mask; the head's Linear
    (weight 10 x 512) absorbs its own. A training step with activity sampling off runs the same
    activation-sized operations as the network alone."""
    counts = {}
    for masked in (False, True):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).train()
        if masked:
            ed = EDropout(model)
            ed.masks.mask.copy_(random_state(ed, gen))
            ed.masks.collect = False
        x = torch.randn(8, 3, 32, 32, generator=gen)
        with _LargeOps(8 * 64 * 8 * 8) as ops_seen:  # the smallest activation of the network's stages
            F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
        counts[masked] = ops_seen.counts
    assert counts[True] == counts[False], counts[True] - counts[False]


@pytest.mark.parametrize("train", [True, False])
def test_absorbed_masks_equal_multiplied_masks(gen, train):
    """The BatchNorm's masked affine parameters and the Linear's masked columns give what multiplying the
    activations gives (the path kept for batched candidates): outputs, running statistics, gradients."""
    torch.manual_seed(1)
    model = SmallCNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    twin = copy.deepcopy(model)
    ed, ed_twin = EDropout(model), EDropout(twin)
    state = random_state(ed, gen)
    ed.masks.mask.copy_(state)
    ed_twin.masks.mask.copy_(state)
    model.train(train), twin.train(train)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    out = model(x)
    with ed_twin.masks.candidates(state[None]):  # one candidate: the multiplying path
        out_twin = twin(x)
    torch.testing.assert_close(out, out_twin, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    out_twin.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, msg=name)


def test_compiled_masked_network_trains_a_step_as_eager(gen):
    """torch.compile of a masked network (after EDropout) trains a step to the same weights as eager."""
    torch.manual_seed(2)
    model = SmallCNN()
    twin = copy.deepcopy(model)
    eds = [EDropout(m, seed=3) for m in (model, twin)]
    state = random_state(eds[0], gen)
    # a kept input channel in each of conv2's two groups: a group with none outputs a constant, which
    # BatchNorm (train mode) normalises into rounding noise, different in eager and compiled code
    state[4] = 1
    for ed in eds:
        ed.masks.mask.copy_(state)
    compiled = torch.compile(twin)
    x, y = data(gen)
    for net, m in ((model, model), (compiled, twin)):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):  # 1.5e-8 apart over 40 seeds
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    dropped = state[:8] == 0
    assert (twin.bn1.weight.grad[dropped] == 0).all() and (twin.conv1.weight.grad[dropped] == 0).all()


@pytest.mark.parametrize("train", [True, False])
def test_conv_without_batchnorm_and_large_linear_multiply_the_activation(gen, train):
    """Where nothing absorbs the mask (a conv with no BatchNorm after it; a Linear whose weight is larger
    than its input) the activation is multiplied: dropped units are zero and get zero gradient."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 40),
                          nn.ReLU(), nn.Linear(40, 5)).train(train)
    ed = EDropout(model)
    # the conv: a hook; the Linears: a forward that folds the mask into the weight when it is the smaller
    # (model[5], 5 x 40 against 4 x 40 inputs) and multiplies the input otherwise (model[3])
    assert len(ed.masks._handles) == 1 and ed.masks._absorbing == [model[3], model[5]]
    state = random_state(ed, gen)
    ed.masks.mask.copy_(state)
    part = {layer.name: state[layer.start:layer.stop] == 0 for layer in ed.units if layer.kind != "classifier_out"}
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.update(conv=o))  # after the mask's hook
    model[3].register_forward_hook(lambda m, i, o: seen.update(fc_in=i[0], fc_out=o))
    model(torch.randn(4, 3, 8, 8, generator=gen)).square().sum().backward()
    assert part["0"].any() and (seen["conv"][:, part["0"]] == 0).all()
    assert (model[0].weight.grad[part["0"]] == 0).all() and (model[0].bias.grad[part["0"]] == 0).all()
    expected = F.linear(seen["fc_in"] * (~part["3"]).float(), model[3].weight, model[3].bias)
    assert part["3"].any() and torch.equal(seen["fc_out"], expected)
    assert (model[3].weight.grad[:, part["3"]] == 0).all() and (model[5].weight.grad[:, part["5"]] == 0).all()
    ed.masks.remove()
    assert "forward" not in model[5].__dict__ and not model[0]._forward_hooks.get(0)


def test_a_second_edropout_on_a_masked_network_is_refused_and_batchnorm_without_affine_absorbs(gen):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    ed = EDropout(model)
    with pytest.raises(ValueError, match="model: 1 is masked by another EDropout already"):
        EDropout(model)
    ed.masks.mask[:4] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    x = torch.randn(3, 3, 8, 8, generator=gen)
    for train in (True, False):
        model.train(train)
        with ed.masks.candidates(ed.masks.mask[None].clone()):  # the multiplying path
            expected = model(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    ed.masks.remove()
    assert EDropout(model).masks._absorbing == [model[1], model[4]]


class _ReadsAWeight(nn.Module):
    """Reads ``a.weight`` directly, behind data-dependent control flow that torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > float("-inf"):
            x = F.linear(x, self.a.weight, self.a.bias)
        return self.b(x)


def test_layers_whose_masks_never_run_are_named_at_the_first_step(gen):
    model = _ReadsAWeight()
    ed = EDropout(model)
    model(torch.randn(2, 4, generator=gen))
    with pytest.warns(UserWarning, match=r"^EDropout: the masks of a did not run .* pass exclude=\[\.\.\.\]"):
        ed.step()
    model = _ReadsAWeight()
    ed = EDropout(model, exclude=["a"])
    model(torch.randn(2, 4, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ed.step()
