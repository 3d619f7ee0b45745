"""A short demonstration of the kernels: EDropout's population search over ResNet-18's kernels.

The fields favour kernels with large weights, h_i = ‖w_i‖ / mean_l ‖w‖ − 1, and the couplings penalise
keeping two similar kernels of one layer, J_ij = −β cos(w_i, w_j); the classifier's outputs are always
kept. ``python -m edropout.demo [--steps N] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from tqdm import tqdm

from . import ops
from .units import prunable_units


def ising_terms(model, beta):
    """Fields, packed couplings and the always-kept mask of ``model``'s units."""
    fields, blocks, keep = [], [], []
    for layer in prunable_units(model):
        if layer.always_kept:
            fields.append(torch.zeros(layer.size))
            blocks.append(torch.zeros(layer.size, layer.size))
        else:
            w = layer.kernels()
            norms = w.norm(dim=1)
            fields.append(norms / norms.mean() - 1)
            unit = w / norms.clamp_min(1e-12)[:, None]
            blocks.append(-beta * unit @ unit.t())
        keep.append(torch.full((layer.size,), layer.always_kept))
    return torch.cat(fields), ops.Couplings.from_blocks(blocks), torch.cat(keep)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m edropout.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision model name (default: resnet18)")
    parser.add_argument("--steps", type=int, default=300, help="generations to run (default: 300)")
    parser.add_argument("--population", type=int, default=8, help="candidate states K (default: 8)")
    parser.add_argument("--beta", type=float, default=1.0, help="coupling strength β (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial states and the evolution")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)(num_classes=102)
    field, couplings, keep = ising_terms(model, args.beta)
    field, couplings, keep = field.to(args.device), couplings.to(args.device), keep.to(args.device)
    D = field.numel()
    print(f"{args.model}: D = {D} units in {len(couplings.sizes)} blocks, K = {args.population}, "
          f"couplings {couplings.values.numel() * 4 / 1e6:.1f} MB, device {args.device}")

    population = (torch.rand(args.population, D) < 0.5).to(torch.uint8).to(args.device)
    population[:, keep] = 1
    energies = ops.ising_energy(population, field, couplings)
    first = float(energies.min())
    start = time.perf_counter()
    with tqdm(range(args.steps), desc="evolve_step", unit="step") as bar:
        for step in bar:
            population, energies, best = ops.evolve_step(
                population, energies, field, couplings, args.seed, step, keep=keep)
            if step % 20 == 0 or step == args.steps - 1:
                kept = population[best].float().mean()
                bar.set_postfix(best=f"{float(energies[best]):.2f}", mean=f"{float(energies.mean()):.2f}",
                                kept=f"{float(kept):.3f}")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    best = int(best)
    print(f"best energy {first:.2f} -> {float(energies[best]):.2f}; best state keeps "
          f"{int(population[best].sum())} of {D} units ({float(population[best].float().mean()):.1%}); "
          f"{elapsed / args.steps * 1e3:.2f} ms per step")


if __name__ == "__main__":
    main()
