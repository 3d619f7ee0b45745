"""The kinds of run, each described once (``KINDS[config.mode]``): how its network and state are made, how
it trains, which report row it gives.

    original   the network alone, no EDropout                                     row Original
    edropout   EDropout's search until the state freezes, then the pruned network rows EDropout(F), (P)
    random     a random state keeping p_init of the units, fixed from the first step (pruning at
               initialisation)                                                    rows Random(p)(F), (P)

The baselines: sibling runs of an edropout run, in <run_dir>/<name>, each measured against the state of
its best.pt (EDropout(P)'s) and trained with the same schedule (epochs and steps) unless said:

    scratch    EDropout's per-layer widths, units drawn at random, fresh weights  Random (scratch)
    uniform    the same fraction of every layer, drawn at random, its kept parameters #p matched to
               EDropout(P)'s (Liu et al., ICLR 2019), fresh weights             Uniform (scratch)
    finetune   the Original's best.pt pruned by magnitude to EDropout's per-layer widths, fine-tuned
               finetune_epochs at finetune_lr                                     Magnitude + fine-tune
    rewind     the same pruned network retrained for as many steps as EDropout trains after its freeze,
               on the same batches, the schedule restarted as after EDropout's freeze (learning-rate
               rewinding, Renda et al., ICLR 2020)                                Magnitude + rewind
    earlybird  Early-Bird's search (edropout.EarlyBird) until its ticket, #p matched to EDropout(P)'s,
               then the slim ticket trained on, the schedule continuing as the authors' retraining
               script does, the L1 penalty on                                     Early-Bird

Adding a kind is one entry of ``KINDS`` (and, for a new way of choosing a state, its criterion in
:mod:`edropout.criteria`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..controller import EDropout
from ..criteria import Magnitude, Random, Uniform
from ..earlybird import STRENGTH, EarlyBird
from ..slim import kept_parameters
from .config import RunError, TrainConfig, finetune_epochs, finetune_lr
from .rundir import load_checkpoint, original_path, read_config, restore

EARLY_BIRD_DISTANCE = 0.1  # the authors' threshold on the masks' normalised Hamming distance


def _no_start(config, run_dir, model, ed, optimizer, device, epoch_steps) -> int:
    return 0


def _start_random(config, run_dir, model, ed, optimizer, device, epoch_steps) -> int:
    generator = torch.Generator().manual_seed(config.seed)
    ed.freeze(torch.rand(ed.units.num_units, generator=generator) < config.p_init)
    return 0


def edropout_state(run_dir: Path, ed: EDropout, device) -> dict:
    """The EDropout state of best.pt in ``run_dir``'s parent folder (an edropout run): its controller's
    state dict, with ``state`` the applied state (bool [D] on the CPU)."""
    parent = Path(run_dir).parent
    parent_config = read_config(parent)
    if parent_config.mode != "edropout":
        raise RunError(f"{run_dir}: a baseline belongs in the folder of an edropout run; {parent} is a run of "
                       f"mode {parent_config.mode!r}")
    reference = load_checkpoint(parent / "best.pt", device).get("edropout")
    if reference is None:
        raise RunError(f"{parent / 'best.pt'}: no EDropout state")
    state = reference["mask"].cpu().bool()
    if state.numel() != ed.units.num_units:
        raise RunError(f"{parent / 'best.pt'}: a state of {state.numel()} units, this network has {ed.units.num_units}")
    return {**reference, "state": state, "config": parent_config, "dir": parent}


def _start_scratch(config, run_dir, model, ed, optimizer, device, epoch_steps) -> int:
    ed.freeze(Random(config.seed).state(ed.units, edropout_state(run_dir, ed, device)["state"]))
    return 0


def _start_uniform(config, run_dir, model, ed, optimizer, device, epoch_steps) -> int:
    state = edropout_state(run_dir, ed, device)["state"]
    ed.freeze(Uniform(config.seed).state(model, ed.units, kept_parameters(model, state, ed.units)[1]))
    return 0


def _magnitude_pruned_original(run_dir, model, ed, optimizer, device) -> dict:
    """Load the Original's best.pt (weights, BatchNorm statistics, optimiser state) and freeze, in each layer,
    the units of largest kernel norm, as many as EDropout(P) keeps there; returns ``edropout_state``."""
    reference = edropout_state(run_dir, ed, device)
    original = original_path(reference["config"], reference["dir"]) / "best.pt"
    restore(load_checkpoint(original, device), model, None, optimizer, path=original)
    ed.freeze(Magnitude().state(ed.units, reference["state"]))
    return reference


def _start_finetune(config, run_dir, model, ed, optimizer, device, epoch_steps) -> int:
    _magnitude_pruned_original(run_dir, model, ed, optimizer, device)
    return 0


def _start_rewind(config, run_dir, model, ed, optimizer, device, epoch_steps) -> int:
    """As finetune, then training begins where EDropout's pruned phase began (its freeze's step), so that it
    trains as many steps, on the same batches, with the learning rate restarted from the same step."""
    reference = _magnitude_pruned_original(run_dir, model, ed, optimizer, device)
    if reference.get("frozen_at") is None:
        raise RunError(f"{reference['dir'] / 'best.pt'}: no step of the freeze recorded (a run from before it was)")
    ed.frozen_at = dict(reference["frozen_at"])
    ed.steps, ed.epoch = ed.frozen_at["step"], ed.frozen_at["step"] // epoch_steps
    return ed.frozen_at["step"]


def _early_bird(config, run_dir, ed, device) -> EarlyBird:
    return EarlyBird(ed, like=edropout_state(run_dir, ed, device)["state"])


@dataclass(frozen=True)
class Kind:
    name: str
    row: Optional[str] = None  # a baseline's report row; None: not a baseline
    label: Optional[str] = None  # rows "<label>(F)" and "<label>(P)" of a run that is not a baseline
    controller: bool = True  # the network has an EDropout controller (a state)
    search: Optional[str] = None  # how the state is searched until it freezes; None: fixed from the first step
    searcher: Optional[Callable] = None  # (config, run_dir, ed, device) -> what steps the search (step, end_epoch)
    batchnorm_l1: float = 0.0  # an L1 penalty on the BatchNorm scales throughout training
    from_original: bool = False  # starts from the Original's best.pt, whose training counts in the row's cost
    sibling: Callable[[TrainConfig], dict] = field(default=lambda config: {})  # a baseline's changes to the parent's config
    # how its network and state are made: (config, run_dir, model, ed, optimizer, device, epoch_steps) -> the step
    # at which training begins
    start: Callable = _no_start


KINDS: Dict[str, Kind] = {kind.name: kind for kind in (
    Kind("original", label="Original", controller=False),
    Kind("edropout", label="EDropout", search="edropout", searcher=lambda config, run_dir, ed, device: ed),
    Kind("random", label="Random({p_init:g})", start=_start_random),
    Kind("scratch", row="Random (scratch)", start=_start_scratch),
    Kind("uniform", row="Uniform (scratch)", start=_start_uniform),
    Kind("finetune", row="Magnitude + fine-tune", from_original=True, start=_start_finetune,
         sibling=lambda config: dict(epochs=finetune_epochs(config), lr=finetune_lr(config),
                                     lr_step=finetune_epochs(config))),  # a constant learning rate
    Kind("rewind", row="Magnitude + rewind", from_original=True, start=_start_rewind,
         sibling=lambda config: dict(lr_after_freeze="restart")),
    Kind("earlybird", row="Early-Bird", search="earlybird", searcher=_early_bird, batchnorm_l1=STRENGTH,
         sibling=lambda config: dict(p_init=1.0, settle_distance=EARLY_BIRD_DISTANCE, freeze="settled",
                                     lr_after_freeze="continue")),
)}
BASELINES = {name: kind.row for name, kind in KINDS.items() if kind.row is not None}


def baseline_names(config: TrainConfig) -> List[str]:
    """The baselines of ``config`` in the order they are trained (that of ``KINDS``)."""
    if not isinstance(config.baselines, str):
        return []
    names = [name.strip() for name in config.baselines.split(",") if name.strip()]
    return sorted(set(names), key=lambda name: (list(BASELINES) + [name]).index(name))


def sibling_config(config: TrainConfig, run_dir: Path, name: str) -> TrainConfig:
    """The config of sibling run ``name`` (original or a baseline) of ``config``'s run in ``run_dir``."""
    values = {**asdict(config), "mode": name, "compare_original": False, "original_dir": None, "baselines": "",
              "run_dir": str(Path(run_dir) / name), **KINDS[name].sibling(config)}
    return TrainConfig.from_dict(values)
