"""One process of the multi-process tests (tests/test_distributed.py), which start it once per rank with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment, as torchrun would:

    python tests/distributed_worker.py OUT_DIR SEED SCENARIO...

Each scenario's result (or its error) goes to OUT_DIR/<scenario>-rank<r>.pt; SEED seeds the network, the
data and the controller. The test imports
``controlled_run`` itself for the single-process reference.

The network has no BatchNorm and tanh activations: under plain DDP BatchNorm normalises each rank's half
batch by its own statistics, so a 2-process run could not equal one process on the whole batch; tanh
leaves no unit without effect on the output, so the energy loss never ties two different states.
"""

import datetime
import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from edropout import EDropout, EnergyLoss, IsingEnergy
from edropout.distributed import RanksDisagree
from edropout.energies import Energy


def network(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 10))


def global_batches(steps, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for _ in range(steps)]


def energy_of(name):
    # refreshed every 2 steps, so that fields and couplings are rebuilt from averaged activity and new weights
    return IsingEnergy(refresh_every=2) if name == "ising" else EnergyLoss(subbatch=None)


def controlled_run(energy, rank=0, world=1, seed=0, steps=8):
    """A few training steps with EDropout; rank r of ``world`` trains on the r-th contiguous share of each
    global batch. Returns the applied state and population energies after every step, and the end."""
    model = network(seed)
    ed = EDropout(model, energy=energy_of(energy), seed=seed, check_ranks=True)
    ed.activity_every = 1  # every forward samples the activity, so every step averages it
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    states, energies = [], []
    for inputs, targets in global_batches(steps, seed=seed):
        share = inputs.shape[0] // world
        x, y = inputs[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ed.step(x, y)
        states.append(ed.state.clone())
        energies.append(ed.energies.clone())
    return {"states": torch.stack(states), "energies": torch.stack(energies), "population": ed.population.clone(),
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def dropped_layer(rank, world, seed):
    """The second convolution's units all dropped and frozen; DDP as users build it (no
    find_unused_parameters), which raises at the second iteration when a parameter had no gradient."""
    model = network(seed)
    ed = EDropout(model, seed=seed, check_ranks=True)
    conv2 = next(layer for layer in ed.units if layer.name == "2")
    state = ed.state.clone()
    state[conv2.start:conv2.stop] = 0
    ed.masks.mask.copy_(state)
    ed.freeze()
    net = DistributedDataParallel(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for inputs, targets in global_batches(3, seed=seed):
        x, y = inputs[rank::world], targets[rank::world]
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ed.step(x, y)
    return {"grads": {name: p.grad.clone() for name, p in model.named_parameters()}, "before": before,
            "after": {k: v.clone() for k, v in model.state_dict().items()}}


class RankDependent(Energy):
    """An energy that differs between ranks and is not averaged: what check_ranks is there to catch."""

    def __call__(self, states, batch=None):
        return states.float().sum(dim=1) * (1 + dist.get_rank())


def disagreement(rank, world, seed):
    model = network(seed)
    ed = EDropout(model, energy=RankDependent(), seed=seed, check_ranks=True)
    inputs, targets = global_batches(1, seed=seed)[0]
    model(inputs)
    try:
        ed.step()
    except RanksDisagree as e:
        return {"error": str(e)}
    return {"error": None}


SCENARIOS = {"ising": lambda r, w, seed: controlled_run("ising", r, w, seed),
             "loss": lambda r, w, seed: controlled_run("loss", r, w, seed),
             "dropped_layer": dropped_layer, "disagreement": disagreement}


def main(out_dir, seed, *scenarios):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for name in scenarios:
            try:
                result = SCENARIOS[name](rank, world, int(seed))
            except Exception as e:  # noqa: BLE001  (reported to the test, which fails with it)
                result = {"exception": f"{type(e).__name__}: {e}"}
            torch.save(result, Path(out_dir) / f"{name}-rank{rank}.pt")
    finally:
        gc.collect()  # DDP's reducer (in a reference cycle) freed while the group lives: see distributed.launched
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
