"""Runs as the command starts them: ``train(config)``, ``train_runs(config, runs)``, ``resume(run_dir)``.

A run is a plan of sibling runs, trained in turn in one process group, then reported together:

    <run_dir>/original/   mode original, the same seed and schedule (compare_original, finetune; or the
                          finished run of original_dir instead)
    <run_dir>/            the run itself (edropout or random)
    <run_dir>/<baseline>/ each baseline (scratch, uniform, finetune, rewind, earlybird; what each is:
                          :mod:`edropout.experiments.kinds`), from the state of the run's best.pt

Each sibling is a run directory of its own (config.json, checkpoints, report), resumable like any: a plan
resumed skips what is finished (its report is the last thing a run writes), continues what was started
and starts the rest. ``train_runs`` runs the plan once per seed in <run_dir>/seed-<s>/ and reports mean ±
std over them.

Several processes (``torchrun --nproc_per_node N -m edropout train``, WORLD_SIZE > 1): every process runs
the same plan on its share of each global batch under DistributedDataParallel; they hold the same weights
and EDropout state, and rank 0 alone writes files. Checkpoints hold the global state (network, optimiser,
population, step), so a run resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import distributed
from .build import load_data
from .config import Diverged, RunError, TrainConfig, check_config, summary_line
from .kinds import BASELINES, baseline_names, sibling_config
from .loop import train_loop
from .plots import plot
from .report import aggregate, report
from .rundir import (WriteFailed, check_data, check_original, config_of_values, config_values, create_run_dir,
                     holds_runs, read_config, remove_leftovers, settings)

__all__ = ["train", "train_runs", "resume", "plan"]


def train(config: Optional[TrainConfig] = None, resume=None, quiet: bool = False, print_report: bool = True) -> Path:
    """Train ``config`` (a new run directory), or continue the run in ``resume``; returns the run directory.
    ``quiet``: no progress bars or per-epoch lines (the final report is printed still, unless not
    ``print_report``). On resume the run's own config.json is used (``config``, when given, only sets the
    device and ``dist_timeout``)."""
    if resume is not None:
        config = _stored(read_config(resume), config)
    config = config or TrainConfig()
    check_config(config)
    with distributed.launched(config.device, config.dist_timeout) as device:
        return run_plan(config, resume, quiet, device, print_report)


def train_runs(config: TrainConfig, runs: int, quiet: bool = False) -> Path:
    """``runs`` runs with seeds seed .. seed+runs-1 in <run_dir>/seed-<s>, and report.md/json over them
    (mean ± std) in <run_dir>. One run is ``train(config)``; ``resume`` continues them."""
    if runs == 1:
        return train(config, quiet=quiet)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise RunError(f"runs must be a positive integer; got {runs!r}")
    check_config(config)
    if config.original_dir is not None:  # resumable from anywhere
        config.original_dir = str(Path(config.original_dir).resolve())
    with distributed.launched(config.device, config.dist_timeout) as device:
        def make_parent():
            fingerprint = load_data(config).fingerprint  # missing data or Original runs: fail before creating anything
            if config.original_dir is not None:
                check_original(config, seeds=range(config.seed, config.seed + runs))
            return str(create_run_dir(config, runs=runs, fingerprint=fingerprint))
        config.run_dir = on_rank0(make_parent)
        _train_seeds(config, Path(config.run_dir), runs, quiet, device)
    return Path(config.run_dir)


def resume(run_dir, device: Optional[str] = None, dist_timeout: Optional[int] = None, quiet: bool = False,
           num_workers: Optional[int] = None) -> Path:
    """Continue the run in ``run_dir``, or every run of a directory of ``train_runs`` (each resumed, started,
    or left as it is when finished, then reported as mean ± std). ``device``, ``dist_timeout`` and
    ``num_workers``, the settings that do not change what is trained, may differ from the run's."""
    values = config_values(run_dir)
    runs = values.pop("runs", None)
    config = config_of_values(values, run_dir) if runs is None else TrainConfig.from_dict(settings(values))
    config = _stored(config, None, device, dist_timeout)
    if num_workers is not None:
        config.num_workers = num_workers
    check_config(config)
    with distributed.launched(config.device, config.dist_timeout) as launched_device:
        if runs is None:
            return run_plan(config, Path(run_dir), quiet, launched_device)
        _train_seeds(config, Path(run_dir), runs, quiet, launched_device)
    return Path(run_dir)


def plan(config: TrainConfig, run_dir: Path) -> List[TrainConfig]:
    """The runs of ``config``'s run in ``run_dir``, in the order they are trained (module docstring)."""
    runs = [sibling_config(config, run_dir, "original")] if config.compare_original and not config.original_dir else []
    return runs + [config] + [sibling_config(config, run_dir, name) for name in baseline_names(config)]


def run_plan(config: TrainConfig, resume: Optional[Path], quiet: bool, device: torch.device,
             print_report: bool = True) -> Path:
    """The plan of ``config`` (checked) in this process, one of ``distributed.world_size()``: each run
    trained, continued, or skipped when finished; then the report over all of them."""
    several, rank0, world = distributed.active(), distributed.rank() == 0, distributed.world_size()
    if config.batch_size % world:
        raise RunError(f"batch_size {config.batch_size} (the global batch) must be divisible by the {world} processes")
    if config.original_dir is not None:
        check_original(config)  # before anything is written
        if resume is None:  # resumable from anywhere
            config.original_dir = str(Path(config.original_dir).resolve())
    if config.mode in BASELINES:  # a baseline alone: EDropout's state must be there before anything is written
        parent = Path(resume if resume is not None else config.run_dir or ".").parent
        if config.run_dir is None or not (parent / "best.pt").is_file():
            raise RunError(f"mode {config.mode} is the baseline that --baselines {config.mode} trains in the folder "
                           f"of an EDropout run; {parent} holds no EDropout best.pt")

    # data, then the run directory (so that missing data leaves nothing behind); rank 0 creates it
    if several and config.download:  # one process downloads, the others then read what it wrote
        on_rank0(lambda: load_data(config).num_classes)
    splits = load_data(config)
    if resume is None:
        config.run_dir = on_rank0(lambda: str(create_run_dir(config, fingerprint=splits.fingerprint)))
    else:  # the data the run started with: another file list would shift the seeded validation split
        check_data(resume, splits.fingerprint, write=rank0)
    run_dir = Path(config.run_dir if resume is None else resume)
    if not quiet and rank0:
        print(summary_line(config, run_dir) + (f", {world} processes" if several else ""))

    if rank0:  # a kill during a write leaves its temporary file, even in a sibling that had finished
        several_runs = [run_dir.parent] if holds_runs(run_dir.parent) else []  # its aggregate report
        for folder in several_runs + [Path(run.run_dir) for run in plan(config, run_dir)]:
            if folder.is_dir():
                remove_leftovers(folder)
    for run in plan(config, run_dir):
        if run is config:
            train_loop(config, run_dir, splits, device, quiet)
            continue
        continuing = _continuing(run)
        if continuing is None:
            continue
        run, started = continuing
        sibling_dir = Path(run.run_dir)
        if not started:
            on_rank0(lambda: str(create_run_dir(run, fingerprint=splits.fingerprint)))
        if not quiet and rank0:
            print(summary_line(run, sibling_dir))
        train_loop(run, sibling_dir, splits, device, quiet)
        if rank0:  # the report last: its report.json marks the sibling finished
            with trained(sibling_dir):
                plot(sibling_dir)
                report(sibling_dir, splits=splits, quiet=True)

    if rank0:
        with trained(run_dir):
            plot(run_dir)
            report(run_dir, splits=splits, quiet=not print_report)  # printed even when quiet: the run's result
    return run_dir


@contextlib.contextmanager
def trained(run_dir: Path):
    """The plots and report of a trained run, a write that fails (full or read-only disk) as one line that
    says the training is kept and how to write them."""
    try:
        yield
    except WriteFailed as e:
        raise RunError(f"{e}; the training is complete and kept: --resume {run_dir} writes the report once the "
                       f"disk has space (or the folder is writable)") from None


def on_rank0(make):
    """``make()`` on rank 0 only; its result, or its RunError, on every rank (one process: ``make()``)."""
    result = error = None
    if distributed.rank() == 0:
        try:
            result = make()
        except RunError as e:
            error = str(e)
    result, error = distributed.broadcast_from_rank0((result, error))
    if error is not None:
        raise RunError(error)
    return result


def _stored(stored: TrainConfig, given: Optional[TrainConfig], device: Optional[str] = None,
            dist_timeout: Optional[int] = None) -> TrainConfig:
    """A run's stored config, with the device and process-group timeout of ``given`` (or those given)."""
    if given is not None:
        stored.device, stored.dist_timeout = given.device, given.dist_timeout
    if device is not None:
        stored.device = device
    if dist_timeout is not None:
        stored.dist_timeout = dist_timeout
    return stored


def _continuing(run: TrainConfig) -> Optional[Tuple[TrainConfig, bool]]:
    """How ``run`` (its run_dir set) goes on: None when finished (its report is the last thing a run
    writes); else its checked config (the stored one, with ``run``'s device and timeout, when it was
    started) and whether it was started."""
    run_dir = Path(run.run_dir)
    if (run_dir / "report.json").is_file():
        return None
    started = (run_dir / "config.json").is_file()
    if started:
        run = _stored(read_config(run_dir), run)
    check_config(run)
    return run, started


def _train_seeds(config: TrainConfig, parent: Path, runs: int, quiet: bool, device: torch.device) -> None:
    """Each seed's run in turn; a seed that diverges does not stop the others, the report leaves it out and
    says so, and Diverged is raised at the end naming it."""
    diverged = {}
    for s in range(config.seed, config.seed + runs):
        continuing = _continuing(replace(config, seed=s, run_dir=str(parent / f"seed-{s}")))
        if continuing is not None:
            run, started = continuing
            try:
                run_plan(run, Path(run.run_dir) if started else None, quiet, device)
            except Diverged as e:
                diverged[s] = str(e)
                if distributed.rank() == 0:
                    print(f"edropout: seed {s}: {e}", file=sys.stderr)
    if distributed.rank() == 0 and len(diverged) < runs:
        with trained(parent):
            aggregate(parent, quiet=quiet, left_out=diverged)
    if diverged:
        raise Diverged(f"{parent}: seed(s) {', '.join(map(str, diverged))} of {runs} diverged "
                       f"({'the report covers the others' if len(diverged) < runs else 'no report'}); "
                       f"each seed's line above says where")
