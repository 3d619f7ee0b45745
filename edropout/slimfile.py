"""Slim files: a slimmed network as plain data (its weights, its state, its architecture), read back with
``torch.load(..., weights_only=True)`` so that opening one runs no code. ``edropout export`` writes them;
``save_slim`` from your own loop.
"""

from __future__ import annotations

import pickle
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .slim import slim
from .units import prunable_units

__all__ = ["save_slim", "load_slim"]

SLIM_FORMAT = "edropout.slim/1"


def save_slim(path, small: nn.Module, state: torch.Tensor, architecture: Mapping) -> Dict:
    """The contents of a slim file for ``small`` (the slim model of ``state``), plain data that
    :func:`load_slim` reads with ``weights_only=True``: the slim weights, the state and ``architecture``
    (``{"model", "in_channels", "num_classes", "stem"}`` of ``edropout.models.build``, and ``"exclude"``, the
    layers the state leaves out, as ``EDropout``'s ``exclude`` names them). Written to ``path`` unless it is
    None."""
    contents = {"format": SLIM_FORMAT, "architecture": dict(architecture),
                "state": state.detach().cpu().to(torch.uint8), "state_dict": small.state_dict()}
    if path is not None:
        torch.save(contents, path)
    return contents


def load_slim(path, model: Optional[nn.Module] = None, map_location="cpu") -> nn.Module:
    """The slimmed network of a slim file (``edropout export``'s slim.pt), in eval mode. The file is read
    with ``torch.load(..., weights_only=True)``: it holds weights and numbers, never code. The network is
    rebuilt by slimming ``model`` (a network of the unslimmed architecture, e.g. a fresh instance of your
    own class) with the file's state, or, when ``model`` is None, the ``edropout.models`` network that
    the file names; then the slim weights are loaded into it."""
    try:
        contents = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = "it holds objects other than plain data" if "GLOBAL" in str(e) else "not a torch file"
        raise ValueError(f"{path}: not a slim file of edropout ({what})") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001  (torch.load raises many kinds for a file that is not its own)
        raise ValueError(f"{path}: not a slim file of edropout (not a torch file: {type(e).__name__})") from None
    if not isinstance(contents, dict) or contents.get("format") != SLIM_FORMAT:
        raise ValueError(f"{path}: not a slim file of edropout (expected format {SLIM_FORMAT!r})")
    if model is None:
        from . import models

        arch = contents["architecture"]
        if arch.get("model") not in models.MODELS:
            raise ValueError(f"{path}: its network, {arch.get('model')!r}, is not one of edropout.models; pass "
                             f"model= (a fresh instance of the unslimmed architecture) to load_slim")
        model = models.build(arch["model"], arch["in_channels"], arch["num_classes"], stem=arch.get("stem", "imagenet"))
    units = prunable_units(model, contents["architecture"].get("exclude", []))
    if contents["state"].numel() != units.num_units:
        raise ValueError(f"model: a network of {units.num_units} prunable units; {path} holds a state of "
                         f"{contents['state'].numel()}")
    small = slim(model.to(map_location), contents["state"], units)
    small.load_state_dict(contents["state_dict"])
    return small.eval()
