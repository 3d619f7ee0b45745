"""The training loop of one run: ``train_loop(config, run_dir, splits, device, quiet)``.

Read top to bottom: the network, its controller and optimiser (from last.pt when the run is resumed, else
as its kind starts: :mod:`edropout.experiments.kinds`), then one loop over epochs: train (a step of the
optimiser, then one of the search while it runs), let the search end its epoch (it may freeze), validate,
write the metrics and the checkpoints. Each epoch is one line of metrics.jsonl:

    epoch, train_loss, train_top1, val_loss, val_top1, lr (at the epoch's first step), time (seconds)
    train_time, train_flops    the training steps' seconds and FLOPs (validation and checkpoints apart)
    search_time, search_flops  the part of them before the freeze
    best_energy, mean_energy   of the population
    kept                       the applied state's fraction of the prunable units
    best_changes               steps of the epoch at which the applied state changed
    diversity                  the population's mean pairwise Hamming distance, a fraction of the units
    ever_kept                  the fraction of the prunable units applied at least once so far
    frozen                     whether the state is frozen (dropout has become pruning)
    frozen_at                  {"epoch": epochs ended, "step": training steps} at the freeze
    settle_distances           the freeze rule's distances at the epoch's checks (edropout.FreezeRule)

Once the state is frozen the network trains physically slim (:func:`edropout.prune`): validation and the
training steps run on the slim network; checkpoints hold the full network with the slim one's weights at the
kept units (``pruned.write_back``) and the slim optimiser's state, and a resumed run slims again.

A run resumed from last.pt continues exactly as if it had not stopped: the data order of epoch e comes from
a generator seeded with (seed, e), and the global RNG states are restored; a run killed mid-epoch restarts
that epoch.
"""

from __future__ import annotations

import contextlib
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
from ..earlybird import batchnorm_l1_
from ..pruning import PrunedNetwork, prune
from . import data
from .build import build_network, build_optimizer, epoch_loader, learning_rate
from .config import Diverged, RunError, TrainConfig, steps_per_epoch
from .costs import counting
from .kinds import KINDS
from .rundir import (WriteFailed, load_checkpoint, read_metrics, restore, rng_states, save_checkpoint,
                     set_rng_states, write_metrics)


def train_loop(config: TrainConfig, run_dir: Path, splits: data.Splits, device: torch.device, quiet: bool) -> None:
    """The epochs of the run in ``run_dir``, from its last.pt when there is one; writes metrics.jsonl,
    best.pt and last.pt (rank 0). The caller removes the leftovers of interrupted writes first
    (:func:`~edropout.experiments.rundir.remove_leftovers`; ``run_plan`` does, for every run of its plan)."""
    several, rank0 = distributed.active(), distributed.rank() == 0
    checkpoint = load_checkpoint(run_dir / "last.pt", device) if (run_dir / "last.pt").exists() else None
    val_loader = DataLoader(splits.val, batch_size=256, num_workers=config.num_workers)
    epoch_steps = steps_per_epoch(config, len(splits.train))
    kind = KINDS[config.mode]
    model, ed = build_network(config, splits.in_channels, splits.num_classes, device, len(splits.train))
    optimizer = build_optimizer(config, model)
    meta = {"in_channels": splits.in_channels, "num_classes": splits.num_classes, "config": asdict(config)}
    start_epoch, best_top1, pruned, partial = 0, -1.0, None, None
    if checkpoint is not None:
        # after the freeze the optimiser's state is the slim network's: loaded once the network is slim again
        restore(checkpoint, model, ed, None if checkpoint.get("pruned") else optimizer, run_dir / "last.pt")
        set_rng_states(checkpoint["rng"])
        start_epoch, best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
        partial = checkpoint.get("partial")  # freeze.pt: the moment of the freeze, within an epoch
    else:  # rewind begins where EDropout's pruned phase began, the others at the first step
        start_epoch, steps_done = divmod(kind.start(config, run_dir, model, ed, optimizer, device, epoch_steps),
                                         epoch_steps)
        partial = {"steps_done": steps_done} if steps_done else None
    search = kind.searcher(config, run_dir, ed, device) if kind.search is not None and not ed.frozen else None
    if ed is not None and ed.frozen:  # a fixed state from the start (random, baselines), or resumed after the freeze
        pruned = start_pruned(config, ed, optimizer)
        if checkpoint is not None and checkpoint.get("pruned"):
            restore(checkpoint, None, None, optimizer, run_dir / "last.pt")
    # metrics of epochs after the checkpoint (a run killed between the two writes) are redone
    history = [m for m in read_metrics(run_dir) if m["epoch"] <= start_epoch]
    if rank0:
        with going_on_after(run_dir, start_epoch):
            write_metrics(run_dir, history)
    net = wrapped(pruned.model if pruned is not None else model, device)
    forward_backward_flops: Dict[tuple, int] = {}  # per (phase, batch size): the same at every step

    def save_freeze(epoch: int, steps_done: int, sums: dict) -> None:
        """freeze.pt: the run at the moment of the freeze (``steps_done`` steps into epoch ``epoch``), from
        which variants of the pruned phase branch (``--resume`` of a copy goes on from there)."""
        if rank0:
            with going_on_after(run_dir, epoch):
                save_checkpoint({"epoch": epoch, "best_top1": best_top1, "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "pruned": False, "edropout": ed.state_dict(),
                                 "rng": rng_states(), "meta": meta, "partial": {**sums, "steps_done": steps_done}},
                                run_dir / "freeze.pt")

    for epoch in range(start_epoch, config.epochs):
        started = time.time()
        net.train()
        loader = epoch_loader(splits.train, config, epoch)
        total = len(loader) if config.limit_batches is None else min(len(loader), config.limit_batches)
        # disable=None: no bar where stderr is not a terminal (a log file, a pipe): the epoch's line stands
        bar = tqdm(loader, total=total, desc=f"{config.mode} epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=True if quiet or not rank0 else None)
        # the epoch's sums: its training loss and accuracy, and the cost of its training steps alone (data,
        # forward, backward, update, search; not validation or checkpoints)
        sums = {"loss_sum": 0.0, "correct": 0, "seen": 0, "lr": None, "train_time": 0.0, "train_flops": 0,
                "search_time": 0.0, "search_flops": 0, "frozen_before": ed is not None and ed.frozen,
                "changes_before": int(ed.changes) if ed is not None else 0,
                "checks_before": len(ed.freeze_rule.distances) if ed is not None else 0, **(partial or {})}
        skip, partial = sums.pop("steps_done", 0), None
        tick = time.perf_counter()
        for i, (inputs, targets) in enumerate(bar):
            if i == total:
                break
            if i < skip:  # resumed from freeze.pt (or rewind): these steps ran before the freeze
                continue
            searching = search is not None and not ed.frozen
            frozen_at = ed.frozen_at["step"] if ed is not None and ed.frozen_at is not None else None
            step_lr = learning_rate(config, epoch * epoch_steps + i, epoch_steps, frozen_at)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            sums["lr"] = step_lr if sums["lr"] is None else sums["lr"]
            inputs, targets = inputs.to(device), targets.to(device)
            known = forward_backward_flops.get((searching, targets.numel()))
            with counting() if known is None else contextlib.nullcontext() as counter:
                logits = net(inputs)
                loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if known is None:
                known = forward_backward_flops[(searching, targets.numel())] = counter.get_total_flops()
            loss_value = loss.item()
            losses = ranks_losses(loss_value, device) if several else [loss_value]
            if not all(map(math.isfinite, losses)):  # stop before the step spreads it into the weights
                kept = f"last.pt of epoch {epoch} kept" if (run_dir / "last.pt").is_file() else "no checkpoint yet"
                bad = [(r, value) for r, value in enumerate(losses) if not math.isfinite(value)]
                where = f" on rank(s) {', '.join(str(r) for r, _ in bad)} of {len(losses)}" if several else ""
                raise Diverged(f"{run_dir}: training diverged: loss {bad[0][1]}{where} at epoch {epoch + 1}, step "
                               f"{i + 1} (learning rate {step_lr:g}); {kept}, no report written; try a lower --lr")
            if kind.batchnorm_l1:
                batchnorm_l1_(pruned.model if pruned is not None else model, kind.batchnorm_l1)
            optimizer.step()
            flops = known
            if searching:
                with counting() as counter:
                    search.step(inputs, targets)
                flops += counter.get_total_flops()
            sums["loss_sum"] += loss_value * targets.numel()
            sums["correct"] += int((logits.argmax(1) == targets).sum())
            sums["seen"] += targets.numel()
            now = time.perf_counter()
            sums["train_time"] += now - tick
            sums["train_flops"] += flops
            if searching:
                sums["search_time"] += now - tick
                sums["search_flops"] += flops
                if ed.frozen:  # the state settled at this step: the pruned phase starts with the next one
                    save_freeze(epoch, i + 1, sums)
                    tick = time.perf_counter()
                    pruned = start_pruned(config, ed, optimizer)
                    net = wrapped(pruned.model, device)
                    net.train()
                    sums["train_time"] += time.perf_counter() - tick
            if not bar.disable:  # quiet, or not rank 0: no population statistics (each one a device sync)
                postfix = {"loss": f"{sums['loss_sum'] / sums['seen']:.3f}",
                           "acc": f"{100.0 * sums['correct'] / sums['seen']:.1f}"}
                if kind.search == "edropout" and not ed.frozen:
                    s = ed.stats()
                    postfix.update(E_best=f"{s['best_energy']:.3g}", E_mean=f"{s['mean_energy']:.3g}",
                                   kept=f"{s['kept']:.3f}", changes=s["changes"] - sums["changes_before"],
                                   diversity=f"{s['diversity']:.3f}", ever=f"{s['ever_kept']:.3f}")
                bar.set_postfix(postfix)
            tick = time.perf_counter()
        bar.close()
        if search is not None and not ed.frozen and ed.freeze_rule.due(ed.epoch + 1):
            save_freeze(epoch, total, sums)  # the deadline: the state freezes as this epoch ends
        if ed is not None:
            tick = time.perf_counter()
            (search or ed).end_epoch()  # may freeze the state at the deadline
            if ed.frozen and pruned is None:
                pruned = start_pruned(config, ed, optimizer)
                net = wrapped(pruned.model, device)
                sums["train_time"] += time.perf_counter() - tick
        loss_sum, correct, seen = sums["loss_sum"], sums["correct"], sums["seen"]
        changes_before, checks_before = sums["changes_before"], sums["checks_before"]
        dynamics = population_stats(ed, changes_before, search=kind.search == "edropout")
        if several:  # the epoch's training loss and accuracy over every rank's samples
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
            loss_sum, correct, seen = distributed.sum_across_ranks_(totals).tolist()

        # validate (EDropout: with the applied state, as the network is trained; slim once frozen); every rank
        # validates its copy, so that none waits for another, and rank 0's result is the one written
        val = evaluate(pruned.model if pruned is not None else model, val_loader, device, topk=(1,))
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
                  "val_loss": val["loss"], "val_top1": val["top1"], **dynamics,
                  "frozen": bool(ed.frozen) if ed is not None else None,
                  "frozen_at": ed.frozen_at if ed is not None else None,
                  "settle_distances": ed.freeze_rule.distances[checks_before:] if ed is not None else None,
                  "lr": sums["lr"], **{key: sums[key] for key in ("train_time", "train_flops", "search_time",
                                                                  "search_flops")},
                  "time": time.time() - started}
        history.append(record)
        if ed is not None and ed.frozen and not sums["frozen_before"]:
            best_top1 = -1.0  # best.pt: the best epoch after the freeze (its state is the one EDropout(P) reports)
        improved = val["top1"] > best_top1
        best_top1 = max(best_top1, val["top1"])
        if not rank0:
            continue
        if not quiet:
            tqdm.write(f"{config.mode} epoch {epoch + 1}: train loss {record['train_loss']:.4f} top-1 "
                       f"{record['train_top1']:.2f} | val loss {val['loss']:.4f} top-1 {val['top1']:.2f} | "
                       f"kept {record['kept']:.3f}" + dynamics_text(record) + (" (frozen)" if record["frozen"] else ""))

        # checkpoints: metrics first, then best.pt, then last.pt (a kill in between redoes the epoch). After the
        # freeze the full network holds the slim one's weights at the kept units (and the dropped units' as at
        # the freeze), the optimiser state is the slim network's.
        if pruned is not None:
            pruned.write_back()
        checkpoint = {"epoch": epoch + 1, "best_top1": best_top1, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "pruned": pruned is not None,
                      "edropout": ed.state_dict() if ed is not None else None, "rng": rng_states(), "meta": meta}
        with going_on_after(run_dir, epoch):
            write_metrics(run_dir, history)
            if improved:
                save_checkpoint(checkpoint, run_dir / "best.pt")
            save_checkpoint(checkpoint, run_dir / "last.pt")


@contextlib.contextmanager
def going_on_after(run_dir: Path, epoch: int):
    """A write of the run that fails on a full or read-only disk (WriteFailed) as one line that adds how to go
    on: from last.pt (of epoch ``epoch``, the last complete checkpoint) where there is one."""
    try:
        yield
    except WriteFailed as e:
        then = (f"last.pt of epoch {epoch} is the last checkpoint: continue with --resume {run_dir}"
                if (run_dir / "last.pt").is_file() else f"no checkpoint yet: --resume {run_dir} starts it again")
        raise RunError(f"{e}; {then} once the disk has space (or the folder is writable)") from None


def ranks_losses(loss_value: float, device: torch.device) -> list:
    """Every rank's loss of this step, on every rank: one whose loss is not finite stops them all at the
    same step (not the others at the process group's timeout, waiting for it)."""
    losses = torch.zeros(distributed.world_size(), dtype=torch.float64, device=device)
    losses[distributed.rank()] = loss_value
    return distributed.sum_across_ranks_(losses).tolist()


def start_pruned(config: TrainConfig, ed: EDropout, optimizer) -> PrunedNetwork:
    """The frozen state's slim network to train on, ``optimizer`` rewired to it (its state reset with
    ``lr_after_freeze`` restart-reset)."""
    pruned = prune(ed, optimizer)
    if config.lr_after_freeze == "restart-reset":
        optimizer.state.clear()
    return pruned


def wrapped(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel where several processes run (DDP averages the gradients; a
    masked network's dropped units are multiplied by zero, so their parameters still take part in the graph:
    no find_unused_parameters), else ``model``."""
    if not distributed.active():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


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
