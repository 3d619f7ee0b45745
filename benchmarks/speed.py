"""EDropout's cost per training iteration, against the original network's, for the six networks.

The reference implementation, a NumPy proof of concept, was 1.33x to 28.97x slower than plain training
(one RTX GPU, Flowers, 8 candidate states); this prints the same table for this implementation on this
device, beside its figures. One training iteration = forward, backward and optimiser step (Adadelta, as
the reference implementation), and
for EDropout everything it adds: masking, activity statistics, evolution, energies, selection. Variants,
each on its own copy of the network, same batch, device and dtype, synthetic inputs (102 classes):

  original   the network alone
  ising      EDropout with the Ising energy (the fused kernel)
  loss       EDropout with the energy loss (population and trials scored in one batched forward)
  margin     EDropout with the released code's margin energy (the trials scored on the whole batch, each
             with its own BatchNorm statistics; not in the default set)
  numpy      EDropout with the population step done as the proof of concept did, in NumPy on the host
             (benchmarks/numpy_step.py: a loop over candidates, dense couplings)
  frozen     after the freeze, masked: a fixed random state keeping --kept of the prunable units applied
             as masks (how the network trained after the freeze before it was slimmed)
  pruned     after the freeze, slim: the same state, the network physically slimmed (edropout.prune)

timed in turn (original, ising, loss, numpy, original, ...) after warm-up, each timed iteration after
--settle untimed ones of the same variant; each variant's ratio is the median over rounds of its time
over the original's time in the same round. The Ising energy's refresh (fields and couplings, then the
population re-scored) comes once every `refresh_every` steps, so the median leaves it out: it is timed on
its own and spread over its period in "ising ratio with refresh" (ratio + refresh / (period × original)).

    python benchmarks/speed.py [--device cpu|cuda] [--models resnet18] [--batch-size 32] [--iters 20]
                               [--energy ising,loss,numpy,frozen,pruned,margin] [--kept 0.4] [--json out.json]
                               [--stem imagenet|cifar]
                               [--quick] [--profile DIR]
                               [--count] [--compile]

--profile DIR also writes, per network and variant, torch.profiler's table of the operators that took
the most time over --iters iterations (DIR/<model>-<variant>.txt), to see where EDropout's cost goes.

--count also counts, after the timing, the operations that reach ATen in --iters iterations of each
variant (a TorchDispatchMode: forward, backward on the CPU, optimiser and EDropout's step) and prints per
network the operations per iteration, and separately those with an output of at least 8192 elements
(views aside): the passes over whole activations, the ones a mask costs on a GPU. On CUDA the backward
runs in autograd's device thread, which the count does not see: count on the CPU.

--compile runs every variant's network through torch.compile (Original compiled against EDropout
compiled); the warm-up iterations compile it (use --warmup 3 or more: EDropout's activity sampling is a
second graph).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import edropout  # noqa: E402
from edropout.energies import EnergyLoss, IsingEnergy, MarginEnergy  # noqa: E402
from edropout.graph import conv_batchnorm_pairs  # noqa: E402
from edropout.masks import UnitMasks  # noqa: E402
from edropout.models import INPUT_SIZE, MODELS, STEMS, build  # noqa: E402
from numpy_step import numpy_step  # noqa: E402
from timing import describe, environment, make_timer  # noqa: E402

REFERENCE_RATIO = {"resnet18": 17.21, "resnet34": 25.12, "resnet50": 19.63, "resnet101": 22.56, "alexnet": 28.97,
              "squeezenet1_1": 1.33}
ENERGIES = ("ising", "loss", "numpy")
AFTER_FREEZE = ("frozen", "pruned")
OPTIONAL = ("margin",)  # measured when asked for


class NumpyStep:
    """EDropout's masks and Ising terms (the library's), with the population step in NumPy on the host, as
    the reference implementation runs it (activity recorded at every forward)."""

    def __init__(self, model, population=8):
        self.units = edropout.prunable_units(model)
        self.unit_masks = UnitMasks(model, self.units, conv_batchnorm_pairs(model))
        self.unit_masks.collect = True
        self.energy = IsingEnergy()
        self.energy.attach(self.units, None)
        device = self.unit_masks.mask.device
        always_kept = self.units.always_kept()
        states = torch.rand(population, self.units.num_units, generator=torch.Generator().manual_seed(0)) < 0.5
        self.population = (states | always_kept).to(torch.uint8).to(device)
        self.always_kept = always_kept.numpy()
        self.energies = None
        self.steps = 0
        self.rng = np.random.default_rng(0)

    def step(self, inputs, targets):
        device = self.population.device
        if self.energies is None or self.steps % self.energy.refresh_every == 0:
            self.energy.refresh(self.unit_masks.activity)
            blocks = [-(b.weights @ b.weights.t()) if isinstance(b, edropout.ops.Factored) else b
                      for b in self.energy.couplings.blocks()]
            self.blocks = [b.cpu().numpy() for b in blocks]
            self.field = self.energy.field.cpu().numpy()
            self.energies = self.energy(self.population)
        population, energies, best = numpy_step(self.population.cpu().numpy(), self.energies.cpu().numpy(),
                                                self.field, self.blocks, self.rng, keep=self.always_kept)
        self.population = torch.from_numpy(population).to(device)
        self.energies = torch.from_numpy(energies).to(device)
        self.unit_masks.mask.copy_(self.population[best])
        self.steps += 1


def make_variant(kind, model, kept=0.4):
    if kind == "original":
        return None
    if kind in AFTER_FREEZE:
        ed = edropout.EDropout(model)
        ed.freeze(torch.rand(ed.units.num_units, generator=torch.Generator().manual_seed(0)) < kept)
        return ed
    if kind == "ising":
        return edropout.EDropout(model, energy=IsingEnergy())
    if kind == "loss":
        return edropout.EDropout(model, energy=EnergyLoss())
    if kind == "margin":
        return edropout.EDropout(model, energy=MarginEnergy())
    return NumpyStep(model)


def bench_model(name, kinds, args, time_it):
    torch.manual_seed(0)
    size = INPUT_SIZE[name]
    base = build(name, 3, 102, stem=args.stem if name.startswith("resnet") else "imagenet").to(args.device)
    x = torch.randn(args.batch_size, 3, size, size, device=args.device)
    y = torch.randint(0, 102, (args.batch_size,), device=args.device)
    runs, ising = {}, None
    for kind in ("original",) + kinds:
        model = copy.deepcopy(base).train()
        optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9, eps=1e-6, weight_decay=1e-5)
        controller = make_variant(kind, model, args.kept)
        if kind == "pruned":  # the slim network trains in the masked one's place; nothing else runs
            model, controller = edropout.prune(controller, optimizer).model, None
        net = torch.compile(model) if args.compile else model  # after EDropout has masked the network

        def iteration(net=net, optimizer=optimizer, controller=controller):
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if controller is not None:
                controller.step(x, y)

        runs[kind] = iteration
        if kind == "ising":
            ising = controller
    for fn in runs.values():  # warm-up, and the first step's scoring
        for _ in range(args.warmup):
            fn()
    times = {kind: [] for kind in runs}
    for _ in range(args.iters):
        for kind, fn in runs.items():
            for _ in range(args.settle):  # the previous variant's worker threads (OpenBLAS spins) go idle
                fn()
            times[kind].append(time_it(fn))
    if args.profile:
        write_profiles(name, runs, args)
    row = {"model": name, "D": edropout.prunable_units(base).num_units,
           "original_ms": 1e3 * statistics.median(times["original"])}
    if args.count:
        row["count"] = {kind: count_ops(fn, args.iters) for kind, fn in runs.items()}
    for kind in kinds:
        row[f"{kind}_ms"] = 1e3 * statistics.median(times[kind])
        row[f"{kind}_ratio"] = statistics.median(t / o for t, o in zip(times[kind], times["original"]))
    if ising is not None:  # the refresh comes every `period` steps: the median above leaves it out
        def refresh():
            ising.energy.refresh(ising.masks.activity)
            ising.energy(ising.population, None)  # the population re-scored, as the controller does

        period = ising.energy.refresh_every
        row["ising_refresh_ms"] = 1e3 * statistics.median(time_it(refresh) for _ in range(3))
        row["ising_refresh_every"] = period
        row["ising_ratio_with_refresh"] = row["ising_ratio"] + row["ising_refresh_ms"] / (period * row["original_ms"])
    return row


ACTIVATION_SIZE = 8192  # elements of an output that counts as a pass over a whole activation


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active, and those whose output has at least
    ACTIVATION_SIZE elements (views aside)."""

    def __init__(self):
        super().__init__()
        self.all, self.large = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.all[name] += 1
        if not func.is_view and any(isinstance(t, torch.Tensor) and t.numel() >= ACTIVATION_SIZE
                                    for t in tree_flatten(out)[0]):
            self.large[name] += 1
        return out


def count_ops(fn, iters):
    """Operations per iteration of ``fn`` over ``iters`` iterations: total, activation-sized, and the
    activation-sized ones by name."""
    with OpCounter() as counter:
        for _ in range(iters):
            fn()
    return {"ops": sum(counter.all.values()) / iters, "large": sum(counter.large.values()) / iters,
            "large_by_op": {k: v / iters for k, v in counter.large.most_common()}}


def count_table(rows, kinds):
    """Markdown: per network and EDropout variant, ATen ops per iteration against Original's, and the
    activation-sized ones EDropout adds, by operation."""
    lines = ["| model | variant | ATen ops / iter, Original | EDropout | ratio | activation-sized ops / iter, "
             "Original | EDropout | added | added, by operation |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        base = row["count"]["original"]
        for kind in kinds:
            c = row["count"][kind]
            added = {op: c["large_by_op"].get(op, 0) - base["large_by_op"].get(op, 0)
                     for op in set(c["large_by_op"]) | set(base["large_by_op"])}
            by_op = ", ".join(f"{op} {n:+.1f}" for op, n in sorted(added.items(), key=lambda kv: -abs(kv[1]))
                              if abs(n) >= 0.05) or "none"
            lines.append(f"| {row['model']} | {kind} | {base['ops']:.1f} | {c['ops']:.1f} | {c['ops'] / base['ops']:.3f} "
                         f"| {base['large']:.1f} | {c['large']:.1f} | {c['large'] - base['large']:+.1f} | {by_op} |")
    return "\n".join(lines)


def write_profiles(name, runs, args):
    """torch.profiler's operator table of each variant over --iters iterations, by self time on the device
    (CUDA) or the host."""
    os.makedirs(args.profile, exist_ok=True)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for kind, fn in runs.items():
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                fn()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=40)
        with open(os.path.join(args.profile, f"{name}-{kind}.txt"), "w") as f:
            f.write(f"# {name}, {kind}, {args.iters} iterations, batch {args.batch_size}, {args.device}\n{table}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 on GPU, 32 on CPU")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per variant first (default 3)")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed iterations before each timed one, so that the variant timed before has "
                             "stopped competing for the cores (default 1)")
    parser.add_argument("--energy", default=",".join(ENERGIES + AFTER_FREEZE),
                        help="EDropout variants, from: " + ", ".join(ENERGIES + AFTER_FREEZE + OPTIONAL))
    parser.add_argument("--stem", default="imagenet", choices=STEMS,
                        help="the ResNets' first layers (edropout.models.build; default imagenet)")
    parser.add_argument("--kept", type=float, default=0.4,
                        help="frozen, pruned: the fraction of the prunable units the state keeps (default 0.4, "
                             "about what EDropout keeps on Fashion-MNIST)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 and SqueezeNet, batch 4, 3 iterations (smoke)")
    parser.add_argument("--profile", metavar="DIR", help="also write torch.profiler tables per network and variant here")
    parser.add_argument("--compile", action="store_true",
                        help="every variant's network through torch.compile (compiled during the warm-up)")
    parser.add_argument("--count", action="store_true",
                        help="also count the ATen operations per iteration, and the activation-sized ones")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    kinds = tuple(args.energy.split(","))
    for given, valid, flag in ((models, MODELS, "--models"), (kinds, ENERGIES + AFTER_FREEZE + OPTIONAL, "--energy")):
        unknown = sorted(set(given) - set(valid))
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; expected some of {', '.join(valid)}")
    if args.quick:
        models = [m for m in models if m in ("resnet18", "squeezenet1_1")]
        args.batch_size, args.iters, args.warmup, args.settle = 4, 3, 1, 0
    if args.batch_size is None:
        args.batch_size = 128 if args.device.startswith("cuda") else 32

    env = environment(args.device)
    print(f"# EDropout / original time per training iteration, {describe(env)}")
    print(f"# batch {args.batch_size}, 102 classes, K = 8, Adadelta{', torch.compile' if args.compile else ''}, "
          f"the ResNets with the {args.stem} stem; "
          f"{args.iters} rounds of the variants in turn "
          f"after {args.warmup} warm-up iterations, each timed iteration after {args.settle} untimed; median ratios")
    refresh = "ising" in kinds
    columns = "".join(f" {k} ms | {k} ratio |" for k in kinds)
    columns += " ising refresh ms | ising ratio with refresh |" if refresh else ""
    if set(kinds) & set(AFTER_FREEZE):
        print(f"# frozen, pruned: a random state keeping {args.kept:g} of the prunable units, masked / slim")
    print(f"| model | D | original ms |{columns} reference ratio (NumPy, RTX) |")
    print("|" + "---|" * (4 + 2 * len(kinds) + 2 * refresh))
    rows = []
    for name in models:
        row = bench_model(name, kinds, args, make_timer(args.device))
        rows.append(row)
        cells = "".join(f" {row[f'{k}_ms']:.1f} | {row[f'{k}_ratio']:.2f}x |" for k in kinds)
        if refresh:
            cells += (f" {row['ising_refresh_ms']:.1f} (every {row['ising_refresh_every']}) | "
                      f"{row['ising_ratio_with_refresh']:.2f}x |")
        print(f"| {name} | {row['D']} | {row['original_ms']:.1f} |{cells} {REFERENCE_RATIO[name]:.2f}x |", flush=True)
    if args.count:
        print(f"\n# ATen operations per iteration ({args.iters} iterations after {args.warmup} warm-up); activation-sized: "
              f"an output of at least {ACTIVATION_SIZE} elements, views aside")
        print(count_table(rows, kinds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "batch_size": args.batch_size, "iters": args.iters, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
