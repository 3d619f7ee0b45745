"""What a run costs: FLOPs counted by ``torch.utils.flop_counter`` (our ops by their own arithmetic,
``ops.FLOPS``, which the counter would count as 0), and a run's training cost summed from metrics.jsonl.

A training step's FLOPs are those of the network's forward and backward (the optimiser's elementwise update
is not counted, as the counter counts no elementwise op) plus, while the search runs, those of ``ed.step``:
its Ising refresh every few steps (the couplings' Gram matrices), the fused evolve-score-select op, or the
energy loss's candidate forwards.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import ops

__all__ = ["counting", "inference_flops", "run_cost"]


def counting() -> FlopCounterMode:
    """A context that counts the FLOPs of what runs within it: ``with counting() as c: ...; c.get_total_flops()``."""
    return FlopCounterMode(display=False, custom_mapping=ops.FLOPS)


@torch.no_grad()
def inference_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward of ``model`` per sample of ``example`` (a batch)."""
    was_training = model.training
    model.eval()
    try:
        with counting() as counter:
            model(example)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // example.shape[0]


def run_cost(metrics: List[dict]) -> Dict[str, float]:
    """A run's training cost from its metrics.jsonl: seconds and FLOPs of its training steps, in all and
    before the freeze (the search). Runs written before the costs were recorded give NaN."""
    nan = float("nan")
    total = {"train_time": 0.0, "train_flops": 0.0, "search_time": 0.0, "search_flops": 0.0}
    for m in metrics:
        for key in total:
            value = m.get(key)
            total[key] += nan if value is None else value
    return total if metrics else {key: nan for key in total}
