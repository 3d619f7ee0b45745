"""Time the population step's kernels on the unit layouts of six torchvision networks (102 classes).

For each layout (one dense coupling block per Conv2d's output channels and per Linear's input features,
random fields and couplings, K = 8), times side by side, in rounds of the variants in turn:
  fused      ops.evolve_step (evolve -> ising_energy -> select)
  fused factored   the same with each block stored the cheaper way: a factor W (J = -W W^T, n x r with r
             the unit's kernel size) where r < n, e.g. AlexNet's Linear layers, else dense
  energy     ops.ising_energy of K states
  evolve     ops.evolve
  reference  edropout.reference.evolve_step with float32 energies (plain PyTorch, one matmul per block)
  numpy      the proof of concept's NumPy step (benchmarks/numpy_step.py), on the host CPU whatever the device
and prints the speed-ups of the fused step and the energy kernel's achieved bandwidth (bytes of
couplings, states and fields read once) beside this device's measured copy bandwidth.

    python benchmarks/kernels.py [--device cpu|cuda] [--models resnet18,alexnet] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import edropout  # noqa: E402
from edropout import ops, reference  # noqa: E402
from numpy_step import numpy_step  # noqa: E402
from timing import describe, environment, make_timer  # noqa: E402

MODELS = ["squeezenet1_1", "resnet18", "resnet34", "alexnet", "resnet50", "resnet101"]


def copy_bandwidth(device, timer, megabytes=512, repeats=5):
    """Bytes read plus bytes written per second by a large device-to-device copy."""
    src = torch.rand(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / seconds


def layout_terms(name, device, gen, factored):
    """Random fields and couplings over the network's unit layout: every block dense, or (factored=True)
    each block stored the cheaper way, as a factor W (n x r, r = the unit's kernel size) where r < n."""
    model = getattr(torchvision.models, name)(num_classes=102)
    units = edropout.prunable_units(model)
    blocks = []
    for layer in units:
        n = layer.size
        r = n if layer.always_kept else layer.kernels().shape[1]
        if factored and r < n:
            blocks.append(ops.Factored(torch.randn(n, r, generator=gen) / r**0.5))
        else:
            blocks.append(torch.randn(n, n, generator=gen))
    couplings = ops.Couplings.from_blocks(blocks)
    del blocks
    keep = units.always_kept()
    field = torch.randn(couplings.num_units, generator=gen)
    return couplings.to(device), field.to(device), keep.to(device)


def bench_model(name, args, timer, host_timer, gen):
    device, K = args.device, args.population
    couplings, field, keep = layout_terms(name, device, gen, factored=False)
    cheapest, _, _ = layout_terms(name, device, gen, factored=True)
    D = field.numel()
    population = (torch.rand(K, D, generator=gen) < 0.5).to(torch.uint8).to(device)
    population[:, keep] = 1
    energies = ops.ising_energy(population, field, couplings)
    step = [0]

    def fused():
        step[0] += 1
        ops.evolve_step(population, energies, field, couplings, 1, step[0], keep=keep)

    def fused_factored():
        step[0] += 1
        ops.evolve_step(population, energies, field, cheapest, 1, step[0], keep=keep)

    variants = {
        "fused": fused,
        "fused_factored": fused_factored,
        "energy": lambda: ops.ising_energy(population, field, couplings),
        "evolve": lambda: ops.evolve(population, 1, step[0], keep=keep),
        "reference": lambda: reference.evolve_step(population, energies, field, couplings, 1, step[0],
                                                   keep=keep, dtype=torch.float32),
    }
    # The proof of concept's step runs on the host whatever the device (timed by the host clock).
    np_pop, np_e, np_h = population.cpu().numpy(), energies.cpu().numpy(), field.cpu().numpy()
    np_blocks = [b.cpu().numpy() for b in couplings.blocks()]
    np_keep, rng = keep.cpu().numpy(), np.random.default_rng(0)
    variants["numpy"] = lambda: numpy_step(np_pop, np_e, np_h, np_blocks, rng, keep=np_keep)
    timers = {v: host_timer if v == "numpy" else timer for v in variants}

    # Rounds of the variants in turn; in each, the variant first runs untimed for --settle seconds, so that
    # the previous variant's worker threads (OpenBLAS and OpenMP spin after a call) have stopped competing
    # for the cores, then --calls timed calls. Medians over all timed calls.
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, fn in variants.items():
            end = time.perf_counter() + args.settle
            fn()
            while time.perf_counter() < end:
                fn()
            times[v] += [timers[v](fn) for _ in range(args.calls)]
    median = {v: statistics.median(t) for v, t in times.items()}
    energy_bytes = couplings.values.numel() * 4 + K * D + 4 * D
    row = {
        "model": name, "D": D, "blocks": len(couplings.sizes), "couplings_MB": couplings.values.numel() * 4 / 1e6,
        "factored_MB": cheapest.values.numel() * 4 / 1e6, "factored_blocks": sum(r > 0 for r in cheapest.ranks),
        **{f"{v}_ms": s * 1e3 for v, s in median.items()},
        "reference_over_fused": median["reference"] / median["fused"],
        "energy_GBps": energy_bytes / median["energy"] / 1e9,
    }
    row["numpy_over_fused"] = median["numpy"] / median["fused"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--population", type=int, default=8, help="K (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the variants in turn (default 3)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per variant and round (default 5)")
    parser.add_argument("--settle", type=float, default=0.2,
                        help="seconds of untimed calls before a variant's timed calls (default 0.2)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="SqueezeNet and ResNet-18 only, 3 rounds (smoke)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    if args.quick:
        models, args.rounds, args.calls, args.settle = [m for m in models if m in ("squeezenet1_1", "resnet18")], 1, 3, 0.0

    timer, host_timer = make_timer(args.device), make_timer("cpu")
    gen = torch.Generator().manual_seed(0)
    env = environment(args.device)
    bandwidth = copy_bandwidth(args.device, timer)
    print(f"# edropout kernels, {describe(env)}")
    print(f"# K = {args.population}; {args.rounds} rounds of the variants in turn, each {args.settle} s untimed then "
          f"{args.calls} timed calls; medians; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    header = ("| model | D | couplings MB | fused ms | energy ms | evolve ms | reference ms | NumPy ms "
              "| NumPy/fused | reference/fused | energy GB/s | % of copy | factored MB | fused factored ms |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for name in models:
        row = bench_model(name, args, timer, host_timer, gen)
        rows.append(row)
        print(f"| {name} | {row['D']} | {row['couplings_MB']:.1f} | {row['fused_ms']:.3f} | {row['energy_ms']:.3f} "
              f"| {row['evolve_ms']:.3f} | {row['reference_ms']:.2f} | {row['numpy_ms']:.2f} | {row['numpy_over_fused']:.1f}x "
              f"| {row['reference_over_fused']:.1f}x | {row['energy_GBps']:.1f} "
              f"| {100 * row['energy_GBps'] * 1e9 / bandwidth:.0f}% | {row['factored_MB']:.1f} "
              f"| {row['fused_factored_ms']:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "population": args.population, "rounds": args.rounds, "calls": args.calls,
                       "copy_GBps": bandwidth / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
