"""``edropout export RUN_DIR``: the slimmed network of a run's best.pt, as files to hand around."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict

import torch

from .. import models
from ..slim import slim
from ..slimfile import save_slim
from ..units import prunable_units
from .build import excluded_layers, open_run
from .rundir import atomic_write_bytes


def export(run_dir, device="cpu") -> Dict[str, Path]:
    """slim.pt (the slimmed network of best.pt, checked against the masked one on a random batch, as plain
    data: its weights, the state and the architecture; ``edropout.load_slim(path)`` rebuilds it, reading
    with ``weights_only=True``) and slim.ts (TorchScript: scripted, or traced where scripting fails;
    ``torch.jit.load``)."""
    run_dir = Path(run_dir)
    config, checkpoint, model, ed = open_run(run_dir, device)
    meta = checkpoint["meta"]
    size = models.INPUT_SIZE[config.model]
    example = torch.randn(2, meta["in_channels"], size, size, device=device)
    small = (slim(model, ed.state, ed.units, check_input=example) if ed is not None else model).eval()
    exclude = excluded_layers(config, model)
    state = ed.state if ed is not None else torch.ones(prunable_units(model, exclude).num_units, dtype=torch.uint8)
    architecture = {"model": config.model, "in_channels": meta["in_channels"], "num_classes": meta["num_classes"],
                    "stem": config.stem, "exclude": exclude}
    contents = save_slim(None, small, state, architecture)
    atomic_write_bytes(run_dir / "slim.pt", lambda f: torch.save(contents, f))
    with warnings.catch_warnings():  # TorchScript's deprecation, once per call: slim.ts says what it is in README
        warnings.simplefilter("ignore", FutureWarning)
        try:
            scripted = torch.jit.script(small)
        except Exception:
            scripted = torch.jit.trace(small, example[:1])
        atomic_write_bytes(run_dir / "slim.ts", lambda f: torch.jit.save(scripted, f))
    return {"slim.pt": run_dir / "slim.pt", "slim.ts": run_dir / "slim.ts"}
