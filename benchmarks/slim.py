"""CPU (or GPU) inference time of the full network against its slimmed copy, for the six networks.

Each network (3 input channels, 102 classes, untrained) gets a state that keeps --keep-rate of its
prunable units, chosen at random (EDropout's initial state with that keep rate); ``edropout.slim``
removes what it can and masks the rest. Forward passes in eval mode, full and slim in turn, --rounds
rounds of --calls timed calls after one untimed; medians.

    python benchmarks/slim.py [--device cpu] [--models resnet18,alexnet] [--keep-rate 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import edropout  # noqa: E402
from edropout.models import INPUT_SIZE, MODELS, build  # noqa: E402
from timing import describe, environment, make_timer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--keep-rate", type=float, default=0.5, help="fraction of prunable units kept (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 at 32x32, 8 at 224x224")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")

    env = environment(args.device)
    print(f"# full vs slim inference, {describe(env)}")
    print(f"# keep rate {args.keep_rate} (random units), 3 channels, 102 classes, eval mode; "
          f"{args.rounds} rounds x {args.calls} calls, medians")
    print("| model | batch | params full | params slim | R % (kept) | full ms | slim ms | full/slim |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    torch.manual_seed(0)
    for name in models:
        model = build(name, 3, 102).to(args.device).eval()
        ed = edropout.EDropout(model, keep_rate=args.keep_rate, seed=0)
        state, units = ed.population[0], ed.units
        ed.remove()  # the full network, without masks
        small = edropout.slim(model, state, units).eval()
        R, kept = edropout.kept_parameters(model, state, units)
        size = INPUT_SIZE[name]
        batch = args.batch_size or (32 if size == 32 else 8)
        x = torch.randn(batch, 3, size, size, device=args.device)
        times = {"full": [], "slim": []}
        time_it = make_timer(args.device)
        with torch.inference_mode():
            for _ in range(args.rounds):
                for label, net in (("full", model), ("slim", small)):
                    net(x)
                    times[label] += [time_it(lambda: net(x)) for _ in range(args.calls)]
        full_ms, slim_ms = (statistics.median(times[k]) * 1e3 for k in ("full", "slim"))
        row = {"model": name, "batch": batch, "params_full": sum(p.numel() for p in model.parameters()),
               "params_slim": sum(p.numel() for p in small.parameters()), "R": R, "kept_parameters": kept,
               "full_ms": full_ms, "slim_ms": slim_ms}
        rows.append(row)
        print(f"| {name} | {batch} | {row['params_full']:,} | {row['params_slim']:,} | {R:.1f} | {full_ms:.2f} "
              f"| {slim_ms:.2f} | {full_ms / slim_ms:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "keep_rate": args.keep_rate, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
