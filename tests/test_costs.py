"""What a run costs: the ops' FLOP formulas, inference FLOPs, a run's training cost, and the learning rate
after the freeze (each step's, as the loop sets it)."""

import pytest
import torch
import torchvision

import edropout
from edropout import ops
from edropout.experiments import build, costs
from edropout.experiments.config import TrainConfig

from helpers import random_couplings, random_field, random_states


def test_the_ops_flops_follow_their_arithmetic():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    K, sizes, ranks = 6, [5, 3, 7], [0, 2, 0]
    D = sum(sizes)
    states, field = random_states(K, D, gen), random_field(D, gen)
    couplings = random_couplings(sizes, gen, ranks=ranks)
    energy = K * (2 * D + 2 * 25 + (2 * 3 * 2 + 2) + 2 * 49)
    with costs.counting() as counter:
        energies = ops.ising_energy(states, field, couplings)
    assert counter.get_total_flops() == energy
    with costs.counting() as counter:
        ops.evolve_step(states, energies, field, couplings, seed=1, step=2)
    assert counter.get_total_flops() == 4 * K * D + energy + K * (D + 1)
    with costs.counting() as counter:
        trials = ops.evolve(states, 1, 2)
        ops.select(states, energies, trials, energies)
    assert counter.get_total_flops() == 4 * K * D + K * (D + 1)


def test_inference_flops_of_a_slim_network_are_fewer():
    model = torchvision.models.resnet18(num_classes=10)
    example = torch.randn(2, 3, 32, 32)
    full = costs.inference_flops(model, example)
    units = edropout.prunable_units(model)
    state = torch.rand(units.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
    small = costs.inference_flops(edropout.slim(model, state, units), example)
    assert 0 < small < full
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:  # per sample
        model.eval()
        with torch.no_grad():
            model(example[:1])
    assert full == counter.get_total_flops()


def test_a_runs_cost_is_the_sum_of_its_epochs():
    metrics = [{"train_time": 2.0, "train_flops": 10, "search_time": 2.0, "search_flops": 10},
               {"train_time": 1.0, "train_flops": 4, "search_time": 0.5, "search_flops": 3}]
    assert costs.run_cost(metrics) == {"train_time": 3.0, "train_flops": 14, "search_time": 2.5, "search_flops": 13}
    older = costs.run_cost([{"time": 3.0}])  # written before the costs were recorded
    assert all(v != v for v in older.values())


def test_the_learning_rate_after_the_freeze():
    config = TrainConfig(epochs=10, lr_step=3, lr_gamma=0.1, optimizer="adadelta")
    n = 60  # steps per epoch; frozen at the end of epoch 5

    def rates(how, frozen_at=300):
        c = TrainConfig(**{**config.__dict__, "lr_after_freeze": how})
        return [build.learning_rate(c, step, n, frozen_at) for step in range(600)]

    cont = rates("continue")
    assert cont == rates("continue", None)  # StepLR: 1.0 for epochs 1-3, 0.1 for 4-6, 0.01 for 7-9, 0.001 for 10
    assert [cont[e * n] for e in range(10)] == pytest.approx([1, 1, 1, .1, .1, .1, .01, .01, .01, .001])
    restart = rates("restart")
    assert restart[:300] == cont[:300]
    # 5 epochs left of 10, a decay every 3: a decay every 1.5 epochs (90 steps), 1.0 -> 0.1 -> 0.01 -> 0.001
    assert restart[300:390] == [1.0] * 90 and restart[390:480] == pytest.approx([0.1] * 90)
    assert restart[480:570] == pytest.approx([0.01] * 90) and restart[570:] == pytest.approx([0.001] * 30)
    # frozen from the start (a scratch run): restart is the schedule itself
    assert rates("restart", 0) == cont
