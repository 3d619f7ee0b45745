"""Every torchvision classification model with EDropout: masks, a training step, and the slimmed network.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (10 classes, untrained, a
batch of 2 random images at a small size the architecture accepts): EDropout on it, one training step
(SGD) and one ``EDropout.step``, then a state that keeps each unit with probability 1/2 (the always-kept
ones kept), and ``edropout.slim(..., check_input=batch)``, which raises unless the slim network's eval-mode
outputs equal the masked network's. Prints one markdown row per model: units D (by kind), parameters, the
slim network's share of them, and R (the share that still acts, :func:`edropout.kept_parameters`).

    python benchmarks/zoo.py [--models a,b,...] [--max-params 30]   (millions; default: every model)

``tests/test_zoo.py`` runs ``check`` on every model (those above 30M parameters under ``-m slow``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torchvision
from torch import nn

import edropout

MODELS = torchvision.models.list_models(module=torchvision.models)


def build(name: str) -> nn.Module:
    """``name`` with 10 classes, at its smallest convenient size (``input_size``)."""
    kwargs = {"num_classes": 10}
    if name.startswith("vit_"):
        kwargs["image_size"] = input_size(name)
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    return torchvision.models.get_model(name, **kwargs)


def input_size(name: str) -> int:
    if name.startswith("vit_"):  # two patches a side
        return 2 * int(name.split("_")[-1])
    if name == "maxvit_t":  # its attention windows need 224
        return 224
    if name == "inception_v3":  # its auxiliary classifier (trained) needs 299
        return 299
    return 64


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check(name: str, seed: int = 0, count: bool = True) -> dict:
    """EDropout on ``name``: a training step, then the slim network of a random state, checked against the
    masked network (``slim`` raises when they differ). Returns the model's row (R only with ``count``)."""
    torch.manual_seed(seed)
    model = build(name)
    ed = edropout.EDropout(model, seed=seed)
    size = input_size(name)
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    loss = nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ed.step(x, y)
    generator = torch.Generator().manual_seed(seed)
    state = (torch.rand(ed.units.num_units, generator=generator) < 0.5) | ed.units.always_kept()
    model.eval()
    small = edropout.slim(model, state, ed.units, check_input=x)
    total = parameters(model)
    kinds = {}
    for layer in ed.units:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + layer.size
    return {"model": name, "D": ed.units.num_units, "kinds": kinds, "params": total,
            "slim": 100.0 * parameters(small) / total,
            "R": edropout.kept_parameters(model, state, ed.units)[0] if count else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated (default: every classification model)")
    parser.add_argument("--max-params", type=float, default=None, help="skip models above this many million parameters")
    args = parser.parse_args(argv)
    names = MODELS if args.models is None else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    print("| model | D | units by kind | parameters | slim % | R % | s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    failed = 0
    for name in names:
        if args.max_params is not None and parameters(build(name)) > args.max_params * 1e6:
            continue
        started = time.time()
        try:
            row = check(name)
        except Exception as e:  # noqa: BLE001  (a row that says what went wrong, then the next model)
            failed += 1
            print(f"| {name} | | {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | |", flush=True)
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in row["kinds"].items())
        print(f"| {name} | {row['D']} | {kinds} | {row['params']:,} | {row['slim']:.1f} | {row['R']:.1f} "
              f"| {time.time() - started:.1f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
