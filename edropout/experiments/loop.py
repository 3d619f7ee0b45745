"""The training loop of one run: ``train_loop(config, run_dir, splits, device, quiet)``.

Read top to bottom: the network, its controller and optimiser (from last.pt when the run is resumed, from
the EDropout run's state for a baseline), then one loop over epochs: train (a step of the optimiser, then
one of EDropout), let the controller end its epoch (it may freeze), validate, write the metrics and the
checkpoints. Each epoch is one line of metrics.jsonl:

    epoch, train_loss, train_top1, val_loss, val_top1, lr, time (seconds)
    best_energy, mean_energy   of the population
    kept                       the applied state's fraction of the prunable units
    best_changes               steps of the epoch at which the applied state changed
    diversity                  the population's mean pairwise Hamming distance, a fraction of the units
    ever_kept                  the fraction of the prunable units applied at least once so far
    frozen                     whether the state is frozen (dropout has become pruning)

A run resumed from last.pt continues exactly as if it had not stopped: the data order of epoch e comes from
a generator seeded with (seed, e), and the global RNG states are restored; a run killed mid-epoch restarts
that epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed
from ..controller import EDropout
from ..criteria import Magnitude, Random
from . import data
from .build import build_network, build_optimizer, epoch_loader, restore
from .config import BASELINES, RunError, TrainConfig
from .rundir import (load_checkpoint, original_path, read_config, read_metrics, rng_states, save_checkpoint,
                     set_rng_states, write_metrics)


def train_loop(config: TrainConfig, run_dir: Path, splits: data.Splits, device: torch.device, quiet: bool) -> None:
    """The epochs of the run in ``run_dir``, from its last.pt when there is one; writes metrics.jsonl,
    best.pt and last.pt (rank 0)."""
    several, rank0 = distributed.active(), distributed.rank() == 0
    checkpoint = load_checkpoint(run_dir / "last.pt", device) if (run_dir / "last.pt").exists() else None
    val_loader = DataLoader(splits.val, batch_size=256, num_workers=config.num_workers)
    model, ed = build_network(config, splits.in_channels, splits.num_classes, device)
    optimizer, scheduler = build_optimizer(config, model)
    meta = {"in_channels": splits.in_channels, "num_classes": splits.num_classes, "config": asdict(config)}
    start_epoch, best_top1 = 0, -1.0
    if checkpoint is not None:
        restore(checkpoint, model, ed, optimizer, scheduler, run_dir / "last.pt")
        set_rng_states(checkpoint["rng"])
        start_epoch, best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
    elif config.mode in BASELINES:
        start_baseline(config, run_dir, model, ed, optimizer, device)
    # metrics of epochs after the checkpoint (a run killed between the two writes) are redone
    history = [m for m in read_metrics(run_dir) if m["epoch"] <= start_epoch]
    if rank0:
        write_metrics(run_dir, history)
    # Several processes: DDP averages the gradients. Dropped units are multiplied by zero, so their
    # parameters still take part in the graph (zero gradients, not missing ones): no find_unused_parameters.
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if several else model

    for epoch in range(start_epoch, config.epochs):
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        net.train()
        loader = epoch_loader(splits.train, config, epoch)
        total = len(loader) if config.limit_batches is None else min(len(loader), config.limit_batches)
        # disable=None: no bar where stderr is not a terminal (a log file, a pipe): the epoch's line stands
        bar = tqdm(loader, total=total, desc=f"{config.mode} epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=True if quiet or not rank0 else None)
        loss_sum, correct, seen = 0.0, 0, 0
        changes_before = int(ed.changes) if ed is not None else 0
        for i, (inputs, targets) in enumerate(bar):
            if i == total:
                break
            inputs, targets = inputs.to(device), targets.to(device)
            logits = net(inputs)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ed is not None:
                ed.step(inputs, targets)
            loss_sum += loss.item() * targets.numel()
            correct += int((logits.argmax(1) == targets).sum())
            seen += targets.numel()
            if bar.disable:  # quiet, or not rank 0: no population statistics (each one a device sync)
                continue
            postfix = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{100.0 * correct / seen:.1f}"}
            if ed is not None and not ed.frozen:
                s = ed.stats()
                postfix.update(E_best=f"{s['best_energy']:.3g}", E_mean=f"{s['mean_energy']:.3g}",
                               kept=f"{s['kept']:.3f}", changes=s["changes"] - changes_before,
                               diversity=f"{s['diversity']:.3f}", ever=f"{s['ever_kept']:.3f}")
            bar.set_postfix(postfix)
        bar.close()
        if ed is not None:
            ed.end_epoch()  # may freeze the state (applied "sample": the best one is applied, a change)
        dynamics = population_stats(ed, changes_before, search=config.mode == "edropout")
        scheduler.step()
        if several:  # the epoch's training loss and accuracy over every rank's samples
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
            loss_sum, correct, seen = distributed.sum_across_ranks_(totals).tolist()

        # validate (EDropout: with the applied state, as the network is trained); every rank validates its
        # copy, so that none waits for another, and rank 0's result is the one written
        val = evaluate(model, val_loader, device, topk=(1,))
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
                  "val_loss": val["loss"], "val_top1": val["top1"], **dynamics,
                  "frozen": bool(ed.frozen) if ed is not None else None, "lr": lr, "time": time.time() - started}
        history.append(record)
        improved = val["top1"] > best_top1
        best_top1 = max(best_top1, val["top1"])
        if not rank0:
            continue
        if not quiet:
            tqdm.write(f"{config.mode} epoch {epoch + 1}: train loss {record['train_loss']:.4f} top-1 "
                       f"{record['train_top1']:.2f} | val loss {val['loss']:.4f} top-1 {val['top1']:.2f} | "
                       f"kept {record['kept']:.3f}" + dynamics_text(record) + (" (frozen)" if record["frozen"] else ""))

        # checkpoints: metrics first, then best.pt, then last.pt (a kill in between redoes the epoch)
        write_metrics(run_dir, history)
        checkpoint = {"epoch": epoch + 1, "best_top1": best_top1, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "edropout": ed.state_dict() if ed is not None else None, "rng": rng_states(), "meta": meta}
        if improved:
            save_checkpoint(checkpoint, run_dir / "best.pt")
        save_checkpoint(checkpoint, run_dir / "last.pt")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device, topk=(1, 3, 5)) -> Dict[str, float]:
    """Mean cross-entropy and top-k accuracies (%) of ``model`` in eval mode over ``loader``."""
    was_training = model.training
    model.eval()
    loss, correct, n = 0.0, {k: 0 for k in topk}, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
        hits = ranked == targets[:, None]
        for k in topk:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        n += targets.numel()
    model.train(was_training)
    return {"loss": loss / max(n, 1), **{f"top{k}": 100.0 * correct[k] / max(n, 1) for k in topk}}


def population_stats(ed: Optional[EDropout], changes_before: int = 0, search: bool = True) -> dict:
    """The epoch's line of population statistics; ``best_changes``: steps of the epoch at which the applied
    state changed (``changes_before``: the controller's count at the epoch's start). Without a search (modes
    random, scratch, finetune: a fixed state) the dynamics are None."""
    if ed is None:
        return {"best_energy": None, "mean_energy": None, "kept": 1.0, "best_changes": None, "diversity": None,
                "ever_kept": None}
    s = ed.stats()
    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    dynamics = {"best_changes": s["changes"] - changes_before, "diversity": s["diversity"], "ever_kept": s["ever_kept"]}
    return {"best_energy": finite(s["best_energy"]), "mean_energy": finite(s["mean_energy"]), "kept": s["kept"],
            **(dynamics if search else dict.fromkeys(dynamics))}


def dynamics_text(record: dict) -> str:
    """The search's dynamics of an epoch's record, for the per-epoch line ('' without a search)."""
    if record.get("best_changes") is None:
        return ""
    return (f" | state changes {record['best_changes']}, diversity {record['diversity']:.3f}, "
            f"ever kept {record['ever_kept']:.3f}")


def start_baseline(config: TrainConfig, run_dir: Path, model, ed: EDropout, optimizer, device) -> None:
    """The start of baseline ``config.mode`` in <parent>/<mode>: a fixed state from the EDropout run of the
    parent folder (the state of its best.pt, reported as EDropout(P)), frozen from the first step.

    scratch: in each layer as many units as that state keeps, chosen at random (``seed``); the weights of a
    fresh network. finetune: the Original's best.pt (weights, BatchNorm statistics and optimiser state), in
    each layer the units of largest kernel norm, as many as that state keeps."""
    parent = Path(run_dir).parent
    parent_config = read_config(parent)
    if parent_config.mode != "edropout":
        raise RunError(f"{run_dir}: a {config.mode} baseline belongs in the folder of an edropout run; "
                       f"{parent} is a run of mode {parent_config.mode!r}")
    reference = load_checkpoint(parent / "best.pt", device)
    if reference.get("edropout") is None:
        raise RunError(f"{parent / 'best.pt'}: no EDropout state")
    state = reference["edropout"]["mask"].cpu().bool()
    if state.numel() != ed.units.num_units:
        raise RunError(f"{parent / 'best.pt'}: a state of {state.numel()} units, this network has {ed.units.num_units}")
    if config.mode == "scratch":
        state = Random(config.seed).state(ed.units, state)
    else:
        original = original_path(parent_config, parent) / "best.pt"
        restore(load_checkpoint(original, device), model, None, optimizer, path=original)
        for group in optimizer.param_groups:  # the Original's optimiser state, at this run's learning rate
            group["lr"] = group["initial_lr"] = config.lr
        state = Magnitude().state(ed.units, state)
    ed.freeze(state)
