"""The pieces of a run, built from its TrainConfig: the data, the network and its EDropout controller, the
optimiser and its schedule, each epoch's batches; and a finished run opened again from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed, models
from ..controller import EDropout
from ..energies import EnergyLoss, IsingEnergy, MarginEnergy
from ..units import released_code_exclude
from . import data
from .config import RunError, TrainConfig, check_config, first_lr, freeze_rule
from .kinds import KINDS
from .rundir import load_checkpoint, read_config, restore  # noqa: F401  (restore: part of this module's use)


def load_data(config: TrainConfig) -> data.Splits:
    try:
        return data.load(config.dataset, config.data_root, models.INPUT_SIZE[config.model],
                         download=config.download, seed=config.seed)
    except (FileNotFoundError, RuntimeError, ValueError, ImportError) as e:
        raise RunError(distributed.first_line(e)) from None


def build_network(config: TrainConfig, in_channels: int, num_classes: int, device=None, train_size: int = 0):
    """The network (initialised from ``seed``) on ``device`` (default ``config.device``) and its EDropout
    controller (None for a kind without one: original); its state as built (a kind's ``start`` sets its own); ``train_size``: training samples (an epoch's steps set how often
    the freeze rule records the state; 0 for a network that is not trained on)."""
    torch.manual_seed(config.seed)
    model = models.build(config.model, in_channels, num_classes, stem=config.stem)
    model = model.to(config.device if device is None else device)
    kind = KINDS[config.mode]
    if not kind.controller:
        return model, None
    energy = {"ising": lambda: IsingEnergy(refresh_every=config.refresh_every), "loss": EnergyLoss,
              "margin": MarginEnergy}[config.energy]()
    ed = EDropout(model, energy=energy, population=config.population, p_init=config.p_init,
                  mutation=config.mutation, rule=config.evolution, applied=config.applied,
                  keep_rate=config.keep_rate if kind.search == "edropout" else None,
                  freeze=freeze_rule(config, train_size), seed=config.seed, exclude=excluded_layers(config, model))
    return model, ed


def excluded_layers(config: TrainConfig, model: nn.Module) -> List[str]:
    """The layers ``config.prunable`` leaves out of the state."""
    return released_code_exclude(model) if config.prunable == "reference" else []


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser; its learning rate is set at every step from :func:`learning_rate`."""
    if config.optimizer == "adadelta":
        return torch.optim.Adadelta(model.parameters(), lr=first_lr(config), rho=config.rho, eps=config.eps,
                                    weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=first_lr(config), momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def learning_rate(config: TrainConfig, step: int, epoch_steps: int, frozen_at: Optional[int] = None) -> float:
    """The learning rate of training step ``step`` (from 0) of epochs of ``epoch_steps`` steps: ``lr`` divided
    by 1 / ``lr_gamma`` every ``lr_step`` epochs (StepLR). With ``lr_after_freeze`` restart and the state
    frozen at step ``frozen_at``, from there the schedule is replayed from ``lr`` over the steps that remain,
    its decays spaced in proportion (5 epochs left of 10 with a decay every 3: a decay every 1.5 epochs)."""
    if frozen_at is None or config.lr_after_freeze == "continue" or step < frozen_at:
        decays = step // (config.lr_step * epoch_steps)
    else:  # (step - frozen_at) / (lr_step * epoch_steps * remaining / total), in integers
        total = config.epochs * epoch_steps
        decays = (step - frozen_at) * total // (config.lr_step * epoch_steps * max(1, total - frozen_at))
    return first_lr(config) * config.lr_gamma ** decays


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of epoch ``epoch``: the same order whether or not the run was resumed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_loader(dataset, config: TrainConfig, epoch: int) -> DataLoader:
    """The training batches of epoch ``epoch``, the same whether or not the run was resumed.

    Several processes: DistributedSampler's order for seed * 1000003 + epoch, rank r taking every N-th sample, so
    each global batch of ``batch_size`` is the same set of samples for any number N of processes (one
    process shuffles with ``epoch_generator`` instead). Each rank's global RNG (augmentation, dropout
    layers) is seeded from (seed, epoch, rank): the ranks draw differently, and a resumed epoch the same."""
    if not distributed.active():
        return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
                          generator=epoch_generator(config.seed, epoch))
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed((config.seed * 1_000_003 + epoch) * 4099 + rank)
    # DistributedSampler seeds epoch e with seed + e: spread the runs' seeds apart as epoch_generator does
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed * 1_000_003,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=config.batch_size // world, sampler=sampler, num_workers=config.num_workers)


def open_run(run_dir, device: Optional[str] = None, name: str = "best.pt"
             ) -> Tuple[TrainConfig, dict, nn.Module, Optional[EDropout]]:
    """A finished run again: (config, the checkpoint ``name``, the network and controller with its states).
    ``device``: where (default: the run's own)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if device is not None:
        config.device = device
    check_config(config)
    checkpoint = load_checkpoint(run_dir / name, config.device)
    meta = checkpoint["meta"]
    model, ed = build_network(config, meta["in_channels"], meta["num_classes"])
    restore(checkpoint, model, ed, path=run_dir / name)
    return config, checkpoint, model, ed
