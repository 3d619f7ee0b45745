"""How the report's "units %" and R compare with what the released code's tables call "kept".

The released code (its ``kept_counter``) counts, over the layers it masks, each kept conv output channel as
k² (its kernel's spatial size, input channels ignored) and each kept classifier input as the number of
classes, divided by the same counts with every unit kept. Ours: units % weighs every prunable unit 1, R is
the fraction of all trainable parameters kept.

    python benchmarks/kept_as_published.py RUN_DIR [RUN_DIR ...]     (best.pt of edropout runs)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from edropout.experiments.build import open_run
from edropout.slim import kept_parameters


def kept_as_published(units, state: torch.Tensor) -> float:
    """The released code's "kept" of ``state`` over ``units``: conv output channels weighed by k², Linear
    inputs by the Linear's outputs; the always-kept classifier outputs left out."""
    kept = total = 0.0
    for layer in units:
        if layer.always_kept:
            continue
        module = layer.module
        if isinstance(module, nn.Conv2d):
            weight = module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            weight = module.out_features
        else:  # attention heads: not in the released code's networks
            raise ValueError(f"{layer.name}: the released code counts conv and Linear units only")
        kept += weight * float(state[layer.start:layer.stop].sum())
        total += weight * layer.size
    return kept / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args()
    print("| run | units % | kept as published % | R % |\n|---|---:|---:|---:|")
    for run_dir in args.run_dirs:
        _, _, model, ed = open_run(run_dir, device="cpu")
        state, units = ed.state.bool(), ed.units
        prunable = ed.prunable.bool()  # as the report's units % counts them
        R, _ = kept_parameters(model, ed.state, units)
        print(f"| {run_dir} | {100 * float(state[prunable].float().mean()):.1f} | "
              f"{100 * kept_as_published(units, state):.1f} | {R:.1f} |")


if __name__ == "__main__":
    main()
