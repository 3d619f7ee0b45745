"""Training with EDropout, start to finish: ``train(TrainConfig(...)) -> run_dir``.

Read top to bottom: the configuration, the data, the network and its EDropout controller, the optimiser
and the schedule, then one loop over epochs (train, validate, write the metrics and checkpoints), then the
report on the test set and the plots.

A run directory holds

    config.json      the TrainConfig of the run
    metrics.jsonl    one line per epoch: train/val loss and top-1, best/mean population energy, kept fraction,
                     the search's dynamics (best_changes: steps at which the applied state changed;
                     diversity: the population's mean pairwise Hamming distance as a fraction of the prunable
                     units; ever_kept: the fraction of them applied at least once so far), learning rate, seconds
    last.pt          the state after the last finished epoch (model, optimiser, scheduler, EDropout, RNGs)
    best.pt          the same at the epoch of the best validation top-1
    report.md/json   the test-set report of best.pt (see ``report``)
    plots.png        loss, accuracy, population energy, kept fraction and the dynamics per epoch
    original/        with compare_original: the run of the same network without EDropout
    scratch/         with baselines scratch: a random state of EDropout's per-layer widths, trained from scratch
    finetune/        with baselines finetune: the Original pruned by magnitude to those widths, fine-tuned

Checkpoints are written to a temporary file in the same folder, flushed to disk and renamed over the old
one, so a run killed at any instant leaves the last good checkpoint. ``train(config, resume=RUN_DIR)``
continues from last.pt exactly as if the run had not stopped: the data order of epoch e comes from a
generator seeded with (seed, e), and the global RNG states are restored; a run killed mid-epoch restarts
that epoch. Checkpoints hold plain data only (tensors, numbers, strings, lists, dicts) and are read with
``torch.load(..., weights_only=True)``: opening a run directory someone sent you runs none of its code, and a
file that is not such a checkpoint is refused with one line.

Several processes (``torchrun --nproc_per_node N -m edropout train``, WORLD_SIZE > 1): every process runs
the same routine on its share of each global batch under DistributedDataParallel (``train_processes``);
they hold the same weights and EDropout state, and rank 0 alone writes the run directory.

Modes: ``edropout`` (the controller evolves the state, then freezes it), ``original`` (the same network
without EDropout) and ``random`` (a random state keeping a fraction ``p_init`` of the units, fixed from
the start); ``scratch`` and ``finetune`` are the baselines' modes. A run is a plan of sibling runs (see
``train_processes``): with ``compare_original`` the original network is trained first, with the same seed
and schedule, in <run_dir>/original/ (or a finished one is named by ``original_dir``); then the run
itself; then each baseline in <run_dir>/<name>/; the report has a row for each.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import data, distributed, models
from . import ops
from .controller import APPLIED, EDropout
from .energies import EnergyLoss, IsingEnergy
from .slim import save_slim
from .units import prunable_units

__all__ = ["TrainConfig", "RunError", "train", "train_runs", "report", "evaluate_run", "export", "plot"]

MODES = ("edropout", "original", "random", "scratch", "finetune")  # the last two: baselines of an edropout run
# The baselines, sibling runs of an EDropout run in <run_dir>/<name>, and their rows in the report
BASELINES = {"scratch": "Random (scratch)", "finetune": "Magnitude + fine-tune"}
# What an Original run must share with the run it is compared with (--original-dir)
SAME_SCHEDULE = ("dataset", "model", "optimizer", "lr", "rho", "eps", "momentum", "weight_decay", "lr_step",
                 "lr_gamma", "batch_size", "epochs", "seed", "limit_batches")
OPTIMIZERS = ("adadelta", "sgd")
ENERGIES = ("ising", "loss")
# Fields a run's config.json may lack (written before they existed) and the behaviour of such a run
OLDER_RUNS = {"evolution": "classic", "freeze_by": 0}
RANDOM_KEPT = (25, 50, 75)  # the random-pruning rows of the report: % of prunable units kept


class RunError(Exception):
    """Bad input or an unusable run directory; the message is one line that names the problem."""


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_root: str = "data"
    model: str = "resnet18"
    mode: str = "edropout"              # "edropout", "original" or "random"
    optimizer: str = "adadelta"         # "adadelta" or "sgd" (momentum, Nesterov)
    lr: Optional[float] = None          # None: 1.0 for adadelta, 0.1 for sgd
    rho: float = 0.9                    # adadelta
    eps: float = 1e-6                   # adadelta
    momentum: float = 0.9               # sgd
    weight_decay: float = 1e-5
    lr_step: int = 50                   # StepLR: multiply the learning rate by lr_gamma every lr_step epochs
    lr_gamma: float = 0.1
    batch_size: int = 128
    epochs: int = 200
    population: int = 8
    freeze_after: int = 100             # epochs before the state may freeze (early state convergence)
    patience: int = 100                 # steps without a change of the best state that freeze it
    freeze_by: Optional[int] = None     # the epoch at whose end the state freezes whatever happens; None: epochs // 2
    evolution: str = "edropout"         # the mutation rule: "edropout" (the reference code's) or "classic" (binary DE)
    mutation: float = 0.1               # the evolution's mutation probability
    applied: str = "best"               # the state applied until the freeze: "best", "sample" or "anneal"
    p_init: float = 0.5
    energy: str = "ising"               # "ising" (IsingEnergy) or "loss" (EnergyLoss, scored on each batch)
    refresh_every: int = 100            # ising: steps between two refreshes of its fields and couplings
    keep_rate: Optional[float] = None   # fraction of the prunable units every state keeps; None: the energy decides
    compare_original: bool = False      # also train mode original (same seed) in <run_dir>/original for the report
    original_dir: Optional[str] = None  # a finished original run to compare with instead (with runs: its seed-<s>/)
    baselines: str = ""                 # comma-separated sibling runs: scratch, finetune (finetune implies compare_original)
    finetune_epochs: Optional[int] = None  # finetune: epochs of fine-tuning; None: epochs // 5, at least 1
    finetune_lr: Optional[float] = None  # finetune: its constant learning rate; None: first lr * lr_gamma
    bn_calibration: int = 2048          # report: training images that re-estimate BatchNorm statistics per row (0: off)
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir: Optional[str] = None       # None: runs/<dataset>-<model>-<mode>-<timestamp>
    download: bool = False
    num_workers: int = 0
    limit_batches: Optional[int] = None  # at most this many training batches per epoch (quick checks, tests)
    dist_timeout: int = 600             # several processes: seconds one waits for the others before failing

    def __post_init__(self):
        if "finetune" in baseline_names(self) or self.original_dir is not None:  # both need the Original
            self.compare_original = True

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RunError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


def baseline_names(config: TrainConfig) -> List[str]:
    """The baselines of ``config`` in the order they are trained: scratch, then finetune."""
    if not isinstance(config.baselines, str):
        return []
    names = [name.strip() for name in config.baselines.split(",") if name.strip()]
    return sorted(set(names), key=lambda name: (list(BASELINES) + [name]).index(name))


def check_config(config: TrainConfig) -> None:
    """Raise RunError (one line) for a configuration that cannot run."""
    if config.dataset not in data.DATASETS:
        raise RunError(f"dataset must be one of {', '.join(data.DATASETS)}; got {config.dataset!r}")
    if config.model not in models.MODELS:
        raise RunError(f"model must be one of {', '.join(models.MODELS)}; got {config.model!r}")
    if config.mode not in MODES:
        raise RunError(f"mode must be one of {', '.join(MODES)}; got {config.mode!r}")
    if config.optimizer not in OPTIMIZERS:
        raise RunError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {config.optimizer!r}")
    if config.energy not in ENERGIES:
        raise RunError(f"energy must be one of {', '.join(ENERGIES)}; got {config.energy!r}")
    if config.keep_rate is not None and not 0.0 < config.keep_rate <= 1.0:
        raise RunError(f"keep_rate must be in (0, 1] or None; got {config.keep_rate!r}")
    if not isinstance(config.baselines, str):
        raise RunError(f"baselines must be a comma-separated string of {', '.join(BASELINES)}; got {config.baselines!r}")
    unknown = [name for name in baseline_names(config) if name not in BASELINES]
    if unknown:
        raise RunError(f"baselines must be among {', '.join(BASELINES)}; got {', '.join(map(repr, unknown))}")
    if baseline_names(config) and config.mode != "edropout":
        raise RunError(f"baselines need mode edropout (they are measured against its state); got mode {config.mode!r}")
    if config.compare_original and config.mode not in ("edropout", "random"):
        raise RunError("compare_original, original_dir and the finetune baseline need mode edropout or random")
    if config.finetune_epochs is not None and (isinstance(config.finetune_epochs, bool)
                                               or not isinstance(config.finetune_epochs, int)
                                               or config.finetune_epochs < 1):
        raise RunError(f"finetune_epochs must be a positive integer or None; got {config.finetune_epochs!r}")
    check_bn_calibration(config.bn_calibration)
    for name in ("batch_size", "epochs", "lr_step", "patience", "refresh_every", "dist_timeout"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RunError(f"{name} must be a positive integer; got {value!r}")
    if config.population < 4:
        raise RunError(f"population must be at least 4; got {config.population!r}")
    if config.freeze_after < 0 or config.num_workers < 0:
        raise RunError("freeze_after and num_workers must not be negative")
    if config.freeze_by is not None and (isinstance(config.freeze_by, bool) or not isinstance(config.freeze_by, int)
                                         or config.freeze_by < 0):
        raise RunError(f"freeze_by must be a non-negative integer (an epoch) or None; got {config.freeze_by!r}")
    if config.evolution not in ops.RULES:
        raise RunError(f"evolution must be one of {', '.join(ops.RULES)}; got {config.evolution!r}")
    if config.applied not in APPLIED:
        raise RunError(f"applied must be one of {', '.join(APPLIED)}; got {config.applied!r}")
    if config.applied == "anneal" and freeze_by(config) is None:
        raise RunError(f"applied anneal needs a freeze deadline of at least epoch 1 (it anneals towards it); "
                       f"got freeze_by {config.freeze_by!r} with {config.epochs} epochs")
    if not 0.0 <= config.mutation <= 1.0:
        raise RunError(f"mutation must be a probability in [0, 1]; got {config.mutation!r}")
    if not 0.0 < config.p_init <= 1.0:
        raise RunError(f"p_init must be in (0, 1]; got {config.p_init!r}")
    for name in ("lr", "finetune_lr"):
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise RunError(f"{name} must be positive; got {value!r}")
    if config.limit_batches is not None and config.limit_batches < 1:
        raise RunError(f"limit_batches must be a positive integer or None; got {config.limit_batches!r}")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise RunError(f"device: not a torch device: {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {config.device!r}: CUDA is not available here")


# -- files ------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file of the same folder, fsync it and rename
    it over ``path``: ``path`` is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def first_line(error: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(checkpoint, f))


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


# Checkpoints written before 2026-11-26 held NumPy's RNG state as an array and the couplings as an
# ops.Couplings: data-only types, allowed so that those runs still load (nothing else is).
_numpy_core = getattr(np, "_core", None) or np.core  # NumPy 2 / 1
OLDER_CHECKPOINT_TYPES = [np.dtype, np.ndarray, _numpy_core.multiarray._reconstruct, ops.Couplings]
OLDER_CHECKPOINT_TYPES += [type(np.dtype(t)) for t in ("u4", "i8", "f8")]


def load_checkpoint(path: Path, device="cpu") -> dict:
    """A checkpoint of this package, read with ``weights_only=True``; RunError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint")
    try:
        with torch.serialization.safe_globals(OLDER_CHECKPOINT_TYPES):
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # a global that is not plain data: another program's file, or worse
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it holds {found.group(1)}" if found else "it holds objects other than plain data"
        raise RunError(f"{path}: not an edropout checkpoint ({what}); refused without running it") from None
    except Exception as e:
        raise RunError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"model", "epoch", "meta"} <= set(checkpoint):
        raise RunError(f"{path}: not an edropout training checkpoint")
    return checkpoint


def _config_values(run_dir) -> dict:
    """The JSON object of ``run_dir``/config.json, or RunError (one line)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.json)")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(values, dict):
        raise RunError(f"{path}: expected a JSON object of TrainConfig fields")
    return values


def read_config(run_dir: Path) -> TrainConfig:
    values = _config_values(run_dir)
    if "runs" in values:  # written by train_runs
        raise RunError(f"{run_dir}: a directory of {values['runs']} runs, not one run: name one of them (seed-*/)")
    return TrainConfig.from_dict({**OLDER_RUNS, **values})


def read_metrics(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, metrics: List[dict]) -> None:
    write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


def start_run_dir(config: TrainConfig) -> Path:
    """A fresh run directory (``new_run_dir``) holding the config.json of ``config``, whose run_dir it becomes."""
    run_dir = new_run_dir(config)
    config.run_dir = str(run_dir)
    write_text(run_dir / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    return run_dir


def new_run_dir(config: TrainConfig) -> Path:
    """The run directory of a fresh run: created, writable and empty, or RunError."""
    if config.run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{config.dataset}-{config.model}-{config.mode}-{stamp}"
    else:
        run_dir = Path(config.run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunError(f"run directory {run_dir} already exists and is not empty (resume it with --resume)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"run directory {run_dir} is not writable ({e.strerror or type(e).__name__})") from None
    return run_dir


# -- the pieces of a run ------------------------------------------------------------------------------------
def load_data(config: TrainConfig) -> data.Splits:
    try:
        return data.load(config.dataset, config.data_root, models.INPUT_SIZE[config.model],
                         download=config.download, seed=config.seed)
    except (FileNotFoundError, RuntimeError, ValueError, ImportError) as e:
        raise RunError(first_line(e)) from None


def build_network(config: TrainConfig, in_channels: int, num_classes: int, device=None):
    """The network (initialised from ``seed``) on ``device`` (default ``config.device``) and its EDropout
    controller (None for mode original)."""
    torch.manual_seed(config.seed)
    model = models.build(config.model, in_channels, num_classes).to(config.device if device is None else device)
    if config.mode == "original":
        return model, None
    energy = EnergyLoss() if config.energy == "loss" else IsingEnergy(refresh_every=config.refresh_every)
    ed = EDropout(model, energy=energy, population=config.population, p_init=config.p_init,
                  mutation=config.mutation, rule=config.evolution, applied=config.applied,
                  keep_rate=config.keep_rate if config.mode == "edropout" else None,
                  freeze_after=config.freeze_after, patience=config.patience, freeze_by=freeze_by(config),
                  seed=config.seed)
    if config.mode == "random":  # a random state, fixed from the start: pruning at initialisation
        generator = torch.Generator().manual_seed(config.seed)
        state = torch.rand(ed.units.num_units, generator=generator) < config.p_init
        ed.masks.mask.copy_((state.to(ed.masks.mask.device) | ed.always_kept).float())
        ed.freeze()
    return model, ed


def freeze_by(config: TrainConfig) -> Optional[int]:
    """The epoch at whose end the state freezes whatever happens (0: no deadline, as runs before it)."""
    value = config.epochs // 2 if config.freeze_by is None else config.freeze_by
    return value if value > 0 else None


def build_optimizer(config: TrainConfig, model: nn.Module):
    if config.optimizer == "adadelta":
        optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0 if config.lr is None else config.lr,
                                         rho=config.rho, eps=config.eps, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 if config.lr is None else config.lr,
                                    momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    return optimizer, scheduler


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


def rng_states() -> dict:
    """The global RNG states as plain data (lists, numbers, tensors)."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    if isinstance(key, torch.Tensor):  # older checkpoints: NumPy's own tuple
        key = key.numpy().astype(np.uint32)
    np.random.set_state((kind, key, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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


# -- training ------------------------------------------------------------------------------------------------
def train(config: Optional[TrainConfig] = None, resume=None, quiet: bool = False, print_report: bool = True) -> Path:
    """Train ``config`` (a new run directory), or continue the run in ``resume``; returns the run directory.
    ``quiet``: no progress bars or per-epoch lines (the final report is printed still, unless not
    ``print_report``).

    On resume the run's own config.json is used (``config``, when given, only sets the device and
    ``dist_timeout``). In a job of several processes (``torchrun``, WORLD_SIZE > 1) every process runs this:
    see :func:`train_processes`."""
    if resume is not None:
        stored = read_config(Path(resume))
        if config is not None:
            stored.device, stored.dist_timeout = config.device, config.dist_timeout
        config = stored
    else:
        config = config or TrainConfig()
    check_config(config)
    with distributed.launched(config.device, config.dist_timeout) as device:
        return train_processes(config, resume, quiet, device, print_report)


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


def train_processes(config: TrainConfig, resume, quiet: bool, device: torch.device,
                    print_report: bool = True) -> Path:
    """The run of :func:`train` (``config`` checked) in this process, one of ``distributed.world_size()``:
    a plan of sibling runs around the run itself, each trained (or finished, or skipped when done) in turn,
    then the report over all of them:

        <run_dir>/original/   mode original, the same seed and schedule (compare_original, finetune;
                              or the finished run of original_dir instead)
        <run_dir>/            the run itself (edropout or random)
        <run_dir>/scratch/    baseline scratch: a random state with EDropout's per-layer unit counts, fixed
                              from the first step, trained from scratch with the same seed and schedule
        <run_dir>/finetune/   baseline finetune: the Original pruned by magnitude to EDropout's per-layer
                              counts, fine-tuned finetune_epochs epochs at finetune_lr (``finetune_lr``)

    Each sibling is a run directory of its own (config.json, checkpoints, report), resumable like any.

    Several processes: DistributedDataParallel over the network, DistributedSampler over the training set;
    ``batch_size`` is the global batch, each process loading batch_size / N samples of it; every process
    holds the same weights and EDropout state, and rank 0 alone writes files. Checkpoints hold the global
    state (network, optimiser, population, step), so a run resumes with any number of processes."""
    several, rank0, world = distributed.active(), distributed.rank() == 0, distributed.world_size()
    if config.batch_size % world:
        raise RunError(f"batch_size {config.batch_size} (the global batch) must be divisible by the {world} processes")
    if config.original_dir is not None:
        check_original(config, original_path(config, None))  # before anything is written
        if resume is None:  # resumable from anywhere
            config.original_dir = str(Path(config.original_dir).resolve())

    if config.mode in BASELINES:  # a sibling run: EDropout's state must be there before anything is written
        parent = Path(resume if resume is not None else config.run_dir or ".").parent
        if config.run_dir is None or not (parent / "best.pt").is_file():
            raise RunError(f"mode {config.mode} is the baseline that --baselines {config.mode} trains in the folder "
                           f"of an EDropout run; {parent} holds no EDropout best.pt")

    # data, then the run directory (so that missing data leaves nothing behind); rank 0 creates it
    if several and config.download:  # one process downloads, the others then read what it wrote
        on_rank0(lambda: load_data(config).num_classes)
    splits = load_data(config)
    if resume is None:
        run_dir = Path(on_rank0(lambda: str(start_run_dir(config))))
        config.run_dir = str(run_dir)
    else:
        run_dir = Path(resume)
    if not quiet and rank0:
        print(summary_line(config, run_dir) + (f", {world} processes" if several else ""))

    if config.compare_original and config.original_dir is None:
        train_sibling(sibling_config(config, run_dir, "original"), quiet)
    train_loop(config, run_dir, splits, device, quiet)
    for name in baseline_names(config):
        train_sibling(sibling_config(config, run_dir, name), quiet)

    if rank0:
        report(run_dir, splits=splits, quiet=not print_report)  # printed even when quiet: the run's result
        plot(run_dir)
    return run_dir


def sibling_config(config: TrainConfig, run_dir: Path, name: str) -> TrainConfig:
    """The config of sibling run ``name`` (original, scratch or finetune) of ``config``'s run in ``run_dir``."""
    values = {**asdict(config), "mode": name, "compare_original": False, "original_dir": None, "baselines": "",
              "run_dir": str(Path(run_dir) / name)}
    if name == "finetune":  # a constant learning rate for finetune_epochs
        epochs = finetune_epochs(config)
        values.update(epochs=epochs, lr=finetune_lr(config), lr_step=epochs)
    return TrainConfig.from_dict(values)


def finetune_epochs(config: TrainConfig) -> int:
    return config.finetune_epochs if config.finetune_epochs is not None else max(1, config.epochs // 5)


def first_lr(config: TrainConfig) -> float:
    return config.lr if config.lr is not None else (1.0 if config.optimizer == "adadelta" else 0.1)


def finetune_lr(config: TrainConfig) -> float:
    """The finetune baseline's learning rate: ``finetune_lr``, by default the schedule's second one (its
    first times lr_gamma), chosen on validation: on Fashion-MNIST (ResNet-18, seed 0) it fine-tuned to
    87.2 % validation top-1 against 82.1, 84.7 and 75.6 % for the first, third and fourth (the last, the
    usual choice) of the schedule (README, "Result on Fashion-MNIST")."""
    return config.finetune_lr if config.finetune_lr is not None else first_lr(config) * config.lr_gamma


def summary_line(config: TrainConfig, run_dir: Path) -> str:
    """The run's first line: what is trained where (every setting is in config.json)."""
    steps = "" if config.limit_batches is None else f" of at most {config.limit_batches} steps"
    return (f"{config.mode} {config.model} on {config.dataset}, {config.epochs} epochs{steps}, seed {config.seed}, "
            f"{config.device}: {run_dir} (settings in config.json)")


def continue_run(config: TrainConfig, quiet: bool, print_report: bool = True) -> Path:
    """The run of ``config`` in its run_dir: left as it is when finished (its report is the last thing a
    run writes), resumed from its last checkpoint when started (config.json), else started."""
    run_dir = Path(config.run_dir)
    if (run_dir / "report.json").is_file():
        return run_dir
    resume = run_dir if (run_dir / "config.json").is_file() else None
    return train(config, resume=resume, quiet=quiet, print_report=print_report)


def train_sibling(config: TrainConfig, quiet: bool) -> Path:
    """Sibling run ``config`` (original or a baseline), trained, finished or left as it is."""
    if not quiet and distributed.rank() == 0 and not (Path(config.run_dir) / "report.json").is_file():
        print(f"training {config.mode} in {config.run_dir}")
    return continue_run(config, quiet, print_report=False)


def original_path(config: TrainConfig, run_dir: Optional[Path]) -> Optional[Path]:
    """The Original run compared with ``config``'s run in ``run_dir``: original_dir (its seed-<seed>/ where
    it holds several runs) or <run_dir>/original; None without compare_original."""
    if config.original_dir is not None:
        given = Path(config.original_dir)
        per_seed = given / f"seed-{config.seed}"
        return per_seed if (per_seed / "config.json").is_file() else given
    return Path(run_dir) / "original" if config.compare_original else None


def check_original(config: TrainConfig, path: Path) -> None:
    """RunError unless ``path`` is a finished run of mode original with ``config``'s data, network, seed and
    schedule."""
    other = read_config(path)
    if other.mode != "original":
        raise RunError(f"original_dir {path}: a run of mode {other.mode!r}, not original")
    differ = [name for name in SAME_SCHEDULE if getattr(other, name) != getattr(config, name)]
    if differ:
        raise RunError(f"original_dir {path}: " + ", ".join(f"{name} {getattr(other, name)!r} (this run: "
                                                              f"{getattr(config, name)!r})" for name in differ))
    if not (path / "report.json").is_file():
        raise RunError(f"original_dir {path}: not finished (resume it first: --resume {path})")


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
        state = layer_random_state(ed, state, config.seed)
    else:
        original = original_path(parent_config, parent) / "best.pt"
        restore(load_checkpoint(original, device), model, None, optimizer, path=original)
        for group in optimizer.param_groups:  # the Original's optimiser state, at this run's learning rate
            group["lr"] = group["initial_lr"] = config.lr
        state = magnitude_state(ed, state)
    ed.masks.mask.copy_(state.to(ed.masks.mask))
    ed.freeze()


def restore(checkpoint: dict, model, ed, optimizer=None, scheduler=None, path="checkpoint") -> None:
    """Load a checkpoint's states; RunError (one line) when they do not fit the network."""
    try:
        model.load_state_dict(checkpoint["model"])
        if ed is not None:
            if checkpoint.get("edropout") is None:
                raise ValueError("no EDropout state")
            ed.load_state_dict(checkpoint["edropout"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: does not fit the network of config.json ({first_line(e)})") from None


# -- the report ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def applied_state(ed: EDropout, state: torch.Tensor):
    """Within the context, ``ed``'s network runs with ``state`` (bool or uint8 [D]) applied through the masks."""
    previous = ed.masks.mask.clone()
    ed.masks.mask.copy_(state.to(ed.masks.mask))
    try:
        with ed.pruned():
            yield
    finally:
        ed.masks.mask.copy_(previous)


def random_state(ed: EDropout, percent: float, seed: int) -> torch.Tensor:
    """A state keeping ``percent`` % of the prunable units, drawn at random (the classifier kept)."""
    prunable = torch.nonzero(~ed.always_kept.cpu()).flatten()
    order = torch.randperm(prunable.numel(), generator=torch.Generator().manual_seed(seed))
    state = ed.always_kept.cpu().clone()
    state[prunable[order[: round(percent / 100.0 * prunable.numel())]]] = True
    return state


def layer_random_state(ed: EDropout, reference: torch.Tensor, seed: int) -> torch.Tensor:
    """A random state of ``reference``'s per-layer widths: in each layer as many units as ``reference``
    (a state, [D]) keeps there, chosen at random with ``seed`` (the classifier kept)."""
    reference = reference.cpu().bool()
    generator = torch.Generator().manual_seed(seed)
    state = ed.always_kept.cpu().clone()
    for layer in ed.units:
        if layer.always_kept:
            continue
        count = int(reference[layer.start:layer.stop].sum())
        state[layer.start + torch.randperm(layer.stop - layer.start, generator=generator)[:count]] = True
    return state


def magnitude_state(ed: EDropout, reference: torch.Tensor) -> torch.Tensor:
    """Magnitude pruning at ``reference``'s size (a state, [D]): in each layer, as many units as
    ``reference`` keeps there, those of largest kernel L2 norm. Per layer, because kernel norms of
    different layers are not comparable (a conv kernel has 9·C weights, a Linear column one per class):
    ranked over the whole network, the classifier's inputs would be the first to go."""
    reference = reference.cpu().bool()
    state = ed.always_kept.cpu().clone()
    for layer in ed.units:
        if layer.always_kept:
            continue
        count = int(reference[layer.start:layer.stop].sum())
        norms = layer.kernels().float().norm(dim=1).cpu()
        state[layer.start + norms.topk(count).indices] = True
    return state


def check_bn_calibration(images) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise RunError(f"bn_calibration must be a number of images >= 0; got {images!r}")


def calibration_batch_size(size: int, images: int) -> int:
    """Batches of up to 128 of a training set of ``size`` images, for ``images`` of them."""
    return max(1, min(128, size, images))


def calibration_loader(dataset, images: int) -> DataLoader:
    """Training images in a fixed random order, in whole batches of up to 128 (a short last batch would
    weigh as much as a full one in the average): ``calibration_count`` of them."""
    return DataLoader(dataset, batch_size=calibration_batch_size(len(dataset), images), shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def calibration_count(size: int, images: int) -> int:
    """How many of a training set of ``size`` images ``calibrated_batchnorm`` reads for ``images``."""
    if images <= 0:
        return 0
    batch_size = calibration_batch_size(size, images)
    return min(-(-images // batch_size), size // batch_size) * batch_size


@contextlib.contextmanager
def calibrated_batchnorm(model: nn.Module, dataset, images: int, device, ed: Optional[EDropout] = None):
    """Within the context, ``model``'s BatchNorm layers use running statistics re-estimated (an equal-weight
    average over batches) on ``images`` training images, the network running as it does when the context is
    entered (with whatever state is applied); the statistics of training are restored on exit.

    Statistics gathered in training describe the network as it was trained, with its masks. A row of the
    report that applies another state (every unit, a random or magnitude state) changes what each
    BatchNorm sees; without re-estimating, its running statistics are those of another network (EDropout(F)
    scored chance on digits that way). ``images`` = 0 keeps the training statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if images <= 0 or not norms:
        yield
        return
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in norms]
    was_training = model.training
    collect = ed.masks.collect if ed is not None else None
    try:
        model.eval()  # dropout layers stay off; only the BatchNorm layers gather statistics
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        if ed is not None:
            ed.masks.collect = False  # the units' activity is a training statistic
        seen = 0
        with torch.no_grad():
            for inputs, _ in calibration_loader(dataset, images):
                model(inputs.to(device))
                seen += inputs.shape[0]
                if seen >= images:
                    break
        model.eval()
        yield
    finally:
        for m, (mean, var, count, momentum) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
        if ed is not None:
            ed.masks.collect = collect
        model.train(was_training)


def _row(name: str, metrics: dict, percent: float, params: int) -> dict:
    return {"method": name, "loss": metrics["loss"], "top1": metrics["top1"], "top3": metrics["top3"],
            "top5": metrics["top5"], "R": percent, "params": params}


def evaluate_run(run_dir, splits: Optional[data.Splits] = None, device=None,
                 bn_calibration: Optional[int] = None) -> List[dict]:
    """The report's rows: best.pt of ``run_dir`` (and of its sibling runs) evaluated on the test set, each
    row with BatchNorm statistics re-estimated for it on ``bn_calibration`` training images (None: the
    run's config). In this order, each where it applies:

        Original                         the original network trained beside it (compare_original)
        EDropout(F)                      every unit
        EDropout(P)                      the applied (frozen) state
        Random (scratch)                 baseline scratch: its fixed random state, trained from scratch
        Magnitude + fine-tune            baseline finetune: the Original pruned, then fine-tuned
        Random 25/50/75% (post-hoc)      random states of the EDropout-trained network, not trained
        Magnitude (post-hoc)             the EDropout-trained network pruned by magnitude to its state's
                                         per-layer counts, not trained
        Magnitude (Original, post-hoc)   the same of the Original

    A random run's rows are Random(p)(F) and Random(p)(P); an original run's row is Original; a baseline
    run's row is its own."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if device is not None:
        config.device = device
    check_config(config)
    calibration = config.bn_calibration if bn_calibration is None else bn_calibration
    check_bn_calibration(calibration)
    checkpoint = load_checkpoint(run_dir / "best.pt", config.device)
    splits = splits or load_data(config)
    meta = checkpoint["meta"]
    if (meta["in_channels"], meta["num_classes"]) != (splits.in_channels, splits.num_classes):
        raise RunError(f"{run_dir / 'best.pt'}: a network for {meta['in_channels']} channel(s) and "
                       f"{meta['num_classes']} classes, the data has {splits.in_channels} and {splits.num_classes}")
    model, ed = build_network(config, splits.in_channels, splits.num_classes)
    restore(checkpoint, model, ed, path=run_dir / "best.pt")
    loader = DataLoader(splits.test, batch_size=256, num_workers=config.num_workers)
    device = torch.device(config.device)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def measure():  # the network as it runs now (masks applied or not), its own BatchNorm statistics
        with calibrated_batchnorm(model, splits.train, calibration, device, ed):
            return evaluate(model, loader, device)

    if ed is None:
        return [_row("Original", measure(), 100.0, total)]

    def state_row(name, state):
        with applied_state(ed, state):
            percent, kept = ed.kept_parameters()
            return _row(name, measure(), percent, kept)

    if config.mode in BASELINES:
        return [state_row(BASELINES[config.mode], ed.state.cpu().clone())]
    label = "EDropout" if config.mode == "edropout" else f"Random({config.p_init:g})"
    rows = {}
    with ed.full():
        rows[f"{label}(F)"] = _row(f"{label}(F)", measure(), 100.0, total)
    state = ed.state.cpu().clone()
    rows[f"{label}(P)"] = state_row(f"{label}(P)", state)
    if config.mode == "edropout":
        for percent in RANDOM_KEPT:
            name = f"Random {percent}% (post-hoc)"
            rows[name] = state_row(name, random_state(ed, percent, config.seed))
        rows["Magnitude (post-hoc)"] = state_row("Magnitude (post-hoc)", magnitude_state(ed, state))
    original = original_path(config, run_dir)
    if original is not None:
        restore(load_checkpoint(original / "best.pt", config.device), model, None, path=original / "best.pt")
        with ed.full():
            rows["Original"] = _row("Original", measure(), 100.0, total)
        name = "Magnitude (Original, post-hoc)"
        rows[name] = state_row(name, magnitude_state(ed, state))
    for baseline in baseline_names(config):  # their own weights and fixed states
        path = run_dir / baseline / "best.pt"
        restore(load_checkpoint(path, config.device), model, ed, path=path)
        rows[BASELINES[baseline]] = state_row(BASELINES[baseline], ed.state.cpu().clone())
    first = ["Original", f"{label}(F)", f"{label}(P)", *BASELINES.values()]
    return [rows[name] for name in first if name in rows] + [row for name, row in rows.items() if name not in first]


COLUMNS = (("loss", "loss", "{:.4f}"), ("top1", "top-1 %", "{:.2f}"), ("top3", "top-3 %", "{:.2f}"),
           ("top5", "top-5 %", "{:.2f}"), ("R", "R %", "{:.2f}"), ("params", "#p", "{:,.0f}"))


def format_table(rows: List[dict], spread: Optional[List[dict]] = None) -> str:
    """A markdown table of report rows (with ± std when ``spread`` gives the rows' standard deviations)."""
    lines = ["| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for i, row in enumerate(rows):
        cells = []
        for key, _, fmt in COLUMNS:
            cell = fmt.format(row[key])
            if spread is not None:
                cell += " ± " + fmt.format(spread[i][key])
            cells.append(cell)
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(run_dir, splits: Optional[data.Splits] = None, device=None, quiet: bool = False,
           bn_calibration: Optional[int] = None) -> dict:
    """Evaluate best.pt on the test set, write report.md and report.json, print the table; returns the report.
    ``bn_calibration``: training images per row for BatchNorm statistics (None: the run's config)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    splits = splits or load_data(config)
    rows = evaluate_run(run_dir, splits, device, bn_calibration)
    calibration = calibration_count(len(splits.train), config.bn_calibration if bn_calibration is None
                                    else bn_calibration)
    metrics = read_metrics(run_dir)
    best = max(metrics, key=lambda m: m["val_top1"]) if metrics else None
    result = {"run_dir": str(run_dir), "dataset": config.dataset, "model": config.model, "mode": config.mode,
              "seed": config.seed, "epochs": len(metrics), "best_epoch": best["epoch"] if best else None,
              "best_val_top1": best["val_top1"] if best else None, "bn_calibration": calibration, "rows": rows}
    siblings = ([f"Original: best.pt of {original_path(config, run_dir)}"] if config.compare_original else []) + \
        [f"{BASELINES[name]}: best.pt of {name}/" for name in baseline_names(config)]
    original = "".join(f"; {text}" for text in siblings)
    heading = (f"# {config.dataset} / {config.model} / {config.mode} (seed {config.seed})\n\n"
               f"Test set, best.pt (epoch {result['best_epoch']} of {len(metrics)}, validation top-1 "
               f"{result['best_val_top1']:.2f} %{original}). " + calibration_note(calibration))
    write_report(run_dir, result, heading, format_table(rows), quiet)
    return result


def write_report(run_dir: Path, result: dict, heading: str, table: str, quiet: bool) -> None:
    """report.json (``result``) and report.md (``heading``, the legend and ``table``); the latter printed
    unless ``quiet``."""
    text = f"{heading} R: % of trainable parameters kept; #p: their number.\n\n{table}\n"
    write_text(run_dir / "report.json", json.dumps(result, indent=2) + "\n")
    write_text(run_dir / "report.md", text)
    if not quiet:
        print(text)


def calibration_note(images: int) -> str:
    if images == 0:
        return "BatchNorm statistics as gathered in training."
    return f"BatchNorm statistics re-estimated for each row (its own state) on {images} training images."


# -- several seeds -------------------------------------------------------------------------------------------
def train_runs(config: TrainConfig, runs: int, quiet: bool = False) -> Path:
    """``runs`` runs with seeds seed .. seed+runs-1 in <run_dir>/seed-<s>, and report.md/json over them
    (mean ± std) in <run_dir>. One run is ``train(config)``; ``resume_runs`` continues them."""
    if runs == 1:
        return train(config, quiet=quiet)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise RunError(f"runs must be a positive integer; got {runs!r}")
    check_config(config)
    with distributed.launched(config.device, config.dist_timeout):  # several processes: one group for all runs
        def make_parent():
            load_data(config)  # missing data or Original runs: fail before creating anything
            for s in range(config.seed, config.seed + runs):
                if config.original_dir is not None:
                    check_original(replace(config, seed=s), original_path(replace(config, seed=s), None))
            parent = new_run_dir(config)
            write_text(parent / "config.json", json.dumps({**asdict(config), "run_dir": str(parent), "runs": runs},
                                                          indent=2) + "\n")
            return str(parent)
        if config.original_dir is not None:  # resumable from anywhere
            config.original_dir = str(Path(config.original_dir).resolve())
        parent = Path(on_rank0(make_parent))
        config.run_dir = str(parent)
        _train_seeds(config, parent, runs, quiet)
    return parent


def resume_runs(parent, device: Optional[str] = None, dist_timeout: Optional[int] = None,
                quiet: bool = False) -> Path:
    """Continue the runs of ``train_runs`` in ``parent``: each seed's run is resumed (or started, or left
    as it is when its report is written), then the runs are reported as mean ± std."""
    parent = Path(parent)
    values = _config_values(parent)
    if "runs" not in values:
        raise RunError(f"{parent}: not a directory of several runs (train --runs N)")
    runs = values.pop("runs")
    config = TrainConfig.from_dict(values)
    if device is not None:
        config.device = device
    if dist_timeout is not None:
        config.dist_timeout = dist_timeout
    check_config(config)
    with distributed.launched(config.device, config.dist_timeout):
        _train_seeds(config, parent, runs, quiet)
    return parent


def holds_runs(run_dir) -> bool:
    """Whether ``run_dir`` is a directory of several runs (written by ``train_runs``)."""
    try:
        return "runs" in _config_values(run_dir)
    except RunError:
        return False


def _train_seeds(config: TrainConfig, parent: Path, runs: int, quiet: bool) -> None:
    for s in range(config.seed, config.seed + runs):
        continue_run(replace(config, seed=s, run_dir=str(parent / f"seed-{s}")), quiet)
    if distributed.rank() == 0:
        aggregate(parent, quiet=quiet)


def seed_dirs(run_dir: Path) -> List[Path]:
    return sorted((p for p in Path(run_dir).glob("seed-*") if (p / "config.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def aggregate(parent, quiet: bool = False, reevaluate: bool = False, device=None,
              bn_calibration: Optional[int] = None) -> dict:
    """Mean ± std (over seeds) of the report rows of each run under ``parent``; writes report.md/json."""
    parent = Path(parent)
    reports = []
    for sub in seed_dirs(parent):
        if reevaluate or not (sub / "report.json").is_file():
            reports.append(report(sub, device=device, quiet=True, bn_calibration=bn_calibration))
        else:
            reports.append(json.loads((sub / "report.json").read_text()))
    if not reports:
        raise RunError(f"{parent}: no finished runs (seed-*/)")
    methods = [row["method"] for row in reports[0]["rows"]]
    for r in reports[1:]:
        if [row["method"] for row in r["rows"]] != methods:
            raise RunError(f"{parent}: the runs' reports have different rows (seed {reports[0]['seed']}: "
                           f"{', '.join(methods)}; seed {r['seed']}: {', '.join(row['method'] for row in r['rows'])})")
    mean, std = [], []
    for i, row in enumerate(reports[0]["rows"]):
        values = {key: torch.tensor([r["rows"][i][key] for r in reports], dtype=torch.float64) for key, _, _ in COLUMNS}
        mean.append({"method": row["method"], **{k: float(v.mean()) for k, v in values.items()}})
        std.append({"method": row["method"], **{k: float(v.std(unbiased=False)) for k, v in values.items()}})
    seeds = [r["seed"] for r in reports]
    result = {"run_dir": str(parent), "seeds": seeds, "rows": mean, "std": std, "runs": reports}
    heading = (f"# {reports[0]['dataset']} / {reports[0]['model']} / {reports[0]['mode']}: {len(reports)} runs "
               f"(seeds {', '.join(map(str, seeds))})\n\nTest set, best.pt of each run, mean ± std over runs. "
               + calibration_note(reports[0].get("bn_calibration", 0)))
    write_report(parent, result, heading, format_table(mean, std), quiet)
    return result


# -- plots and export ----------------------------------------------------------------------------------------
def plot(run_dir) -> Optional[Path]:
    """plots.png: per epoch, loss, top-1, best and mean population energy, the kept and ever-kept fractions,
    the changes of the applied state and the population's diversity (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    epochs = [m["epoch"] for m in metrics]
    series = lambda key: [np.nan if m.get(key) is None else m[key] for m in metrics]  # noqa: E731
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax, keys, title in ((axes[0, 0], ("train_loss", "val_loss"), "loss"),
                            (axes[0, 1], ("train_top1", "val_top1"), "top-1 %"),
                            (axes[0, 2], ("best_energy", "mean_energy"), "population energy"),
                            (axes[1, 0], ("kept", "ever_kept"), "fraction of the prunable units"),
                            (axes[1, 1], ("best_changes",), "steps at which the applied state changed"),
                            (axes[1, 2], ("diversity",), "population diversity (mean pairwise Hamming)")):
        for key in keys:
            ax.plot(epochs, series(key), marker=".", label=key.replace("_", " "))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(run_dir / "plots.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return run_dir / "plots.png"


def export(run_dir, device="cpu") -> Dict[str, Path]:
    """slim.pt (the slimmed network of best.pt as plain data: its weights, the state and the architecture;
    ``edropout.load_slim(path)`` rebuilds it, reading with ``weights_only=True``) and slim.ts (TorchScript:
    scripted, or traced where scripting fails; ``torch.jit.load``)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    config.device = device
    check_config(config)
    checkpoint = load_checkpoint(run_dir / "best.pt", device)
    meta = checkpoint["meta"]
    model, ed = build_network(config, meta["in_channels"], meta["num_classes"])
    restore(checkpoint, model, ed, path=run_dir / "best.pt")
    small = (ed.slim() if ed is not None else model).eval()
    state = ed.state if ed is not None else torch.ones(prunable_units(model).num_units, dtype=torch.uint8)
    architecture = {"model": config.model, "in_channels": meta["in_channels"], "num_classes": meta["num_classes"]}
    contents = save_slim(None, small, state, architecture)
    atomic_write_bytes(run_dir / "slim.pt", lambda f: torch.save(contents, f))
    try:
        scripted = torch.jit.script(small)
    except Exception:
        size = models.INPUT_SIZE[config.model]
        scripted = torch.jit.trace(small, torch.zeros(1, meta["in_channels"], size, size, device=device))
    atomic_write_bytes(run_dir / "slim.ts", lambda f: torch.jit.save(scripted, f))
    return {"slim.pt": run_dir / "slim.pt", "slim.ts": run_dir / "slim.ts"}
