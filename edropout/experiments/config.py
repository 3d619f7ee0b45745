"""A run's configuration: :class:`TrainConfig`, its checks, and what is derived from it.

Each field carries its command-line help (``metadata["help"]``), from which ``edropout train --help`` is
written, so a field, its default and its help live in one place. The defaults are the EDropout paper's
schedule (its reference implementation's); the command starts from a small schedule instead (``SMALL``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from .. import models, ops
from ..controller import APPLIED, check_arguments
from ..freezing import FreezeRule, ReleasedCodeRule
from . import data

# What an Original run must share with the run it is compared with (--original-dir)
SAME_SCHEDULE = ("dataset", "model", "stem", "optimizer", "lr", "rho", "eps", "momentum", "weight_decay", "lr_step",
                 "lr_gamma", "batch_size", "epochs", "seed", "limit_batches")
OPTIMIZERS = ("adadelta", "sgd")
ENERGIES = ("ising", "loss", "margin")
PRUNABLE = ("all", "reference")
FREEZE = ("settled", "reference")
# --preset: the released research code's choices at once (README, "Differences from the released code")
PRESETS = {"reference": dict(stem="cifar", energy="margin", prunable="reference", freeze="reference")}
# Fields a run's config.json may lack (written before they existed) and the behaviour of such a run
OLDER_RUNS = {"evolution": "classic", "freeze_by": 0, "settle_distance": 0.0, "lr_after_freeze": "continue"}
# Fields of older runs' config.json that no longer exist (the patience rule, replaced by settle_distance; with
# the command's schedules the deadline always came first), dropped when read
RETIRED = ("freeze_after", "patience")
LR_AFTER_FREEZE = ("continue", "restart", "restart-reset")
# The command's starting point without --config: about a minute on a 2-core CPU with digits
SMALL = dict(epochs=15, batch_size=64, lr_step=12)


class RunError(Exception):
    """Bad input or an unusable run directory; the message is one line that names the problem."""


class Diverged(Exception):
    """Training stopped at a non-finite loss; the message is one line: where, the learning rate, what is kept."""


def _option(default, help: str, shown: Optional[str] = None):
    """A field with its command-line help; ``shown``: the default as the help states it, when not the value."""
    return field(default=default, metadata={"help": help, "shown": shown})


def _one_of(choices) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}"


@dataclass
class TrainConfig:
    dataset: str = _option("digits", _one_of(data.DATASETS))
    data_root: str = _option("data", "folder of the data sets")
    download: bool = _option(False, "download missing torchvision data sets into --data-root")
    model: str = _option("resnet18", _one_of(models.MODELS))
    stem: str = _option("imagenet", "the ResNets' first layers: imagenet (torchvision's 7x7 stride-2 convolution "
                                    "and max-pooling) or cifar (the released code's 3x3 stride-1 convolution, no "
                                    "pooling; about 15x the FLOPs at 32x32)")
    mode: str = _option("edropout", "edropout, original (no EDropout) or random (a random state keeping --p-init "
                                    "of the units, fixed from the start); a baseline's name is the mode of its "
                                    "sibling run")
    compare_original: bool = _option(False, "also train mode original with the same seed and schedule in "
                                             "RUN_DIR/original; the report adds Original and Magnitude (Original, "
                                             "post-hoc)")
    original_dir: Optional[str] = _option(None, "compare with this finished run of mode original (same data, "
                                                "network, seed and schedule; with --runs, a directory of them, "
                                                "seed-<s>/) instead of training one in RUN_DIR/original; implies "
                                                "--compare-original", "none")
    baselines: str = _option("", "comma-separated sibling runs in RUN_DIR/<name>, each against EDropout(P)'s "
                                 "state: scratch (its per-layer widths, random units, from scratch), uniform (the "
                                 "same fraction of every layer, its #p matched, from scratch), finetune and rewind "
                                 "(the Original pruned by magnitude to its widths, fine-tuned at a small rate or "
                                 "retrained with the schedule restarted as after its freeze; both imply "
                                 "--compare-original), earlybird (Early-Bird's ticket, its #p matched)", "none")
    finetune_epochs: Optional[int] = _option(None, "baseline finetune: epochs of fine-tuning",
                                             "a fifth of --epochs, at least 1")
    finetune_lr: Optional[float] = _option(None, "baseline finetune: its constant learning rate",
                                           "the schedule's second, --lr times --lr-gamma, chosen on validation")
    epochs: int = _option(200, "training epochs")
    batch_size: int = _option(128, "batch size (the global batch with several processes)")
    optimizer: str = _option("adadelta", "adadelta or sgd (momentum, Nesterov)")
    lr: Optional[float] = _option(None, "learning rate", "1.0 for adadelta, 0.1 for sgd")
    rho: float = _option(0.9, "Adadelta's rho")
    eps: float = _option(1e-6, "Adadelta's eps")
    momentum: float = _option(0.9, "SGD's momentum")
    weight_decay: float = _option(1e-5, "weight decay")
    lr_step: int = _option(50, "StepLR: epochs between two decays of the learning rate")
    lr_gamma: float = _option(0.1, "StepLR: factor of each decay")
    population: int = _option(8, "candidate states K, at least 4")
    p_init: float = _option(0.5, "probability that a unit is kept in the initial states, in (0, 1]")
    energy: str = _option("ising", "ising (Ising energy, refreshed every --refresh-every steps), loss (energy "
                                   "loss of 8 samples of each batch, parents re-scored) or margin (the released "
                                   "code's: -10 x the mean margin on the whole batch, each state's BatchNorm with its "
                                   "own batch statistics, parents' energies kept from when they were scored)")
    prunable: str = _option("all", "the prunable layers: all (every conv and Linear input) or reference (the "
                                   "released code's, ResNets only: each block's conv2 and the classifier's inputs)")
    refresh_every: int = _option(10, "ising: steps between two refreshes of its fields and couplings")
    keep_rate: Optional[float] = _option(None, "every state keeps this fraction of the prunable units, in (0, 1]",
                                         "none, the energy decides")
    settle_distance: float = _option(0.2, "the state freezes once settled: the newest of the last 5 applied "
                                          "states (recorded every --settle-every steps) differs from each of the "
                                          "others in at most this fraction of the units, in [0, 1] (chosen on "
                                          "validation); 0: never settles (the deadline decides)")
    settle_every: Optional[int] = _option(None, "steps between two recorded states of --settle-distance",
                                          "a quarter of an epoch")
    freeze: str = _option("settled", "when the state freezes: settled (--settle-distance, or the deadline "
                                     "--freeze-by) or reference (the released code's: from the 12th batch of epoch "
                                     "--freeze-by, once the best energy equals one of the 9 before it; the "
                                     "deadline the end of that epoch)")
    freeze_by: Optional[int] = _option(None, "the epoch at whose end the state freezes whatever happens; 0: none",
                                       "half of --epochs")
    lr_after_freeze: str = _option("restart", "the learning rate after the freeze: continue (the schedule goes "
                                              "on), restart (the schedule replayed from --lr over the steps that "
                                              "remain, its decays spaced in proportion; chosen on validation) or "
                                              "restart-reset (restart, the optimiser's state reset too)")
    evolution: str = _option("edropout", "the evolution's mutation rule: edropout (the reference "
                                         "implementation's; a converged population keeps exploring) or classic "
                                         "(binary differential evolution)")
    mutation: float = _option(0.1, "the evolution's mutation probability")
    applied: str = _option("best", "the state applied until the freeze: best (the population's best), sample (a "
                                   "member drawn at each step) or anneal (a drawn member with probability 1 - "
                                   "epoch / --freeze-by, else the best)")
    bn_calibration: int = _option(2048, "report: training images on which each row re-estimates its BatchNorm "
                                        "statistics; 0 keeps those of training")
    seed: int = _option(0, "seed of the initial weights, data order, validation split, states and evolution")
    device: str = _option("cuda" if torch.cuda.is_available() else "cpu", "cpu or cuda",
                          "cuda when available")
    num_workers: int = _option(0, "data loader worker processes")
    run_dir: Optional[str] = _option(None, "run directory", "runs/<dataset>-<model>-<mode>-<time>")
    limit_batches: Optional[int] = _option(None, "at most this many training batches per epoch (quick checks)",
                                           "all")
    dist_timeout: int = _option(600, "several processes (torchrun): seconds a process waits for the others "
                                     "before it fails")

    def __post_init__(self):
        from .kinds import KINDS, baseline_names  # the kinds of run build on this module
        if self.original_dir is not None or any(KINDS[name].from_original for name in baseline_names(self)
                                                if name in KINDS):
            self.compare_original = True

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = {key: value for key, value in values.items() if key not in RETIRED}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RunError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


def help_text(name: str) -> str:
    """The command-line help of field ``name``, with the command's default and the paper's schedule."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    if f.type == "bool":
        return f.metadata["help"]
    shown = f.metadata["shown"] or str(f.default)
    if name in SMALL:
        shown = f"{SMALL[name]}; the paper's schedule {f.default}"
    return f"{f.metadata['help']} (default {shown})"


def freeze_by(config: TrainConfig) -> Optional[int]:
    """The epoch at whose end the state freezes whatever happens (0: no deadline, as runs before it)."""
    value = config.epochs // 2 if config.freeze_by is None else config.freeze_by
    return value if value > 0 else None


def steps_per_epoch(config: TrainConfig, train_size: int) -> int:
    """Training steps of one epoch of a training set of ``train_size`` samples."""
    steps = -(-train_size // config.batch_size)
    return steps if config.limit_batches is None else min(steps, config.limit_batches)


def freeze_rule(config: TrainConfig, train_size: int) -> FreezeRule:
    """The controller's freeze rule of ``config`` (``settle_every``: a quarter of an epoch by default)."""
    epoch_steps = max(1, steps_per_epoch(config, train_size))
    if config.freeze == "reference":
        return ReleasedCodeRule(start=freeze_by(config), epoch_steps=epoch_steps, deadline=freeze_by(config))
    every = config.settle_every or max(1, epoch_steps // 4)
    return FreezeRule(distance=config.settle_distance or None, every=every, deadline=freeze_by(config))


def check_choices(config: TrainConfig) -> None:
    """RunError (one line) for a field that names none of its choices (a model, a data set, a mode...)."""
    from .kinds import KINDS  # the kinds of run build on this module
    for name, choices in (("dataset", data.DATASETS), ("model", models.MODELS), ("mode", tuple(KINDS)),
                          ("optimizer", OPTIMIZERS), ("energy", ENERGIES), ("evolution", ops.RULES),
                          ("stem", models.STEMS), ("prunable", PRUNABLE), ("freeze", FREEZE),
                          ("applied", APPLIED), ("lr_after_freeze", LR_AFTER_FREEZE)):
        if getattr(config, name) not in choices:
            raise RunError(f"{name} must be one of {', '.join(choices)}; got {getattr(config, name)!r}")


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_config(config: TrainConfig) -> None:
    """Raise RunError (one line) for a configuration that cannot run."""
    from .kinds import BASELINES, baseline_names  # the kinds of run build on this module
    check_choices(config)
    if not isinstance(config.baselines, str):
        raise RunError(f"baselines must be a comma-separated string of {', '.join(BASELINES)}; got {config.baselines!r}")
    unknown = [name for name in baseline_names(config) if name not in BASELINES]
    if unknown:
        raise RunError(f"baselines must be among {', '.join(BASELINES)}; got {', '.join(map(repr, unknown))}")
    if baseline_names(config) and config.mode != "edropout":
        raise RunError(f"baselines need mode edropout (they are measured against its state); got mode {config.mode!r}")
    if config.compare_original and config.mode not in ("edropout", "random"):
        raise RunError("compare_original, original_dir and the finetune and rewind baselines need mode edropout or "
                       "random")
    if config.finetune_epochs is not None and not _positive_int(config.finetune_epochs):
        raise RunError(f"finetune_epochs must be a positive integer or None; got {config.finetune_epochs!r}")
    check_bn_calibration(config.bn_calibration)
    for name in ("batch_size", "epochs", "lr_step", "refresh_every", "dist_timeout"):
        if not _positive_int(getattr(config, name)):
            raise RunError(f"{name} must be a positive integer; got {getattr(config, name)!r}")
    if config.num_workers < 0:
        raise RunError(f"num_workers must not be negative; got {config.num_workers!r}")
    if config.settle_every is not None and not _positive_int(config.settle_every):
        raise RunError(f"settle_every must be a positive integer or None; got {config.settle_every!r}")
    if isinstance(config.settle_distance, bool) or not isinstance(config.settle_distance, (int, float)) \
            or not 0.0 <= config.settle_distance <= 1.0:
        raise RunError(f"settle_distance must be a fraction of the units in [0, 1]; got {config.settle_distance!r}")
    if config.freeze_by is not None and (isinstance(config.freeze_by, bool) or not isinstance(config.freeze_by, int)
                                         or config.freeze_by < 0):
        raise RunError(f"freeze_by must be a non-negative integer (an epoch) or None; got {config.freeze_by!r}")
    if config.stem != "imagenet" and not config.model.startswith("resnet"):
        raise RunError(f"stem {config.stem!r} is one of the ResNets'; {config.model} has its own first layers")
    if config.prunable == "reference" and not config.model.startswith("resnet"):
        raise RunError(f"prunable reference is the released code's choice for the ResNets; got model {config.model}")
    if config.freeze == "reference" and freeze_by(config) is None:
        raise RunError(f"freeze reference needs --freeze-by of at least epoch 1 (the epoch from which it looks); "
                       f"got freeze_by {config.freeze_by!r} with {config.epochs} epochs")
    if config.applied == "anneal" and freeze_by(config) is None:
        raise RunError(f"applied anneal needs a freeze deadline of at least epoch 1 (it anneals towards it); "
                       f"got freeze_by {config.freeze_by!r} with {config.epochs} epochs")
    try:  # what the controller itself checks, in its words
        check_arguments(population=config.population, p_init=config.p_init, mutation=config.mutation,
                        keep_rate=config.keep_rate, freeze=FreezeRule(deadline=freeze_by(config)))
    except (ValueError, TypeError) as e:
        raise RunError(str(e)) from None
    if config.p_init == 0:
        raise RunError(f"p_init must be in (0, 1]; got {config.p_init!r}")
    for name in ("lr", "finetune_lr"):
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise RunError(f"{name} must be positive; got {value!r}")
    if config.limit_batches is not None and not _positive_int(config.limit_batches):
        raise RunError(f"limit_batches must be a positive integer or None; got {config.limit_batches!r}")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise RunError(f"device: not a torch device: {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {config.device!r}: CUDA is not available here")


def check_bn_calibration(images) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise RunError(f"bn_calibration must be a number of images >= 0; got {images!r}")


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
    """A run's first line: what is trained where (every setting is in config.json)."""
    steps = "" if config.limit_batches is None else f" of at most {config.limit_batches} steps"
    epochs = f"{config.epochs} epoch" + ("s" if config.epochs != 1 else "")
    return (f"{config.mode} {config.model} on {config.dataset}, {epochs}{steps}, seed {config.seed}, "
            f"{config.device}: {run_dir} (settings in config.json)")
