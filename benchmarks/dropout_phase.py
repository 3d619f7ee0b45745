"""Candidates for EDropout's dropout phase (the evolution's rule, the applied state, the mutation
probability) compared on validation, to choose the defaults (never on the test set).

    python benchmarks/dropout_phase.py OUT_DIR [--dataset fashion] [--epochs 6] [--limit-batches 60]
        [--model resnet18] [--lr-step 2] [--seed 0] [--candidates classic,edropout,sample,sample-m0.2] [--out FILE.md]

Each candidate is an EDropout run in OUT_DIR/<candidate>/ (resumed or kept when already there) with the
same seed, data and schedule; the state freezes at the default deadline (half of the epochs). From its
last.pt, with BatchNorm statistics re-estimated per row as the report does, the table gives validation
top-1 of EDropout(F) (every unit) and EDropout(P) (the frozen state), R, and the dynamics of the dropout
phase from metrics.jsonl: steps at which the applied state changed per epoch, the fraction of the
prunable units ever applied by the freeze, and the population's diversity at the freeze.
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import edropout
from edropout.experiments import build, config as configs, loop, report, rundir

CANDIDATES = {  # name: TrainConfig fields (each spelled out, so that a table stays the same when defaults move)
    "classic": dict(evolution="classic", applied="best", refresh_every=100),
    "edropout": dict(evolution="edropout", applied="best", refresh_every=100),
    "sample": dict(evolution="edropout", applied="sample", refresh_every=100),
    "sample-m0.2": dict(evolution="edropout", applied="sample", mutation=0.2, refresh_every=100),
    "classic-sample": dict(evolution="classic", applied="sample", refresh_every=100),
    "edropout-r10": dict(evolution="edropout", applied="best", refresh_every=10),
    "sample-r10": dict(evolution="edropout", applied="sample", refresh_every=10),
    "anneal": dict(evolution="edropout", applied="anneal", refresh_every=100),
}


def validation_rows(run_dir: Path, splits, device) -> dict:
    """Validation top-1 of EDropout(F) and (P) from last.pt, and R."""
    config, _, model, ed = build.open_run(run_dir, str(device), name="last.pt")
    loader = DataLoader(splits.val, batch_size=256)

    def measure():
        with report.calibrated_batchnorm(model, splits.train, config.bn_calibration, device, ed):
            return loop.evaluate(model, loader, device, topk=(1,))["top1"]

    with ed.full():
        full = measure()
    pruned = measure()
    return {"F": full, "P": pruned, "R": edropout.kept_parameters(model, ed.state, ed.units)[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dataset", default="fashion")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit-batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr-step", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", default="classic,edropout,sample,sample-m0.2",
                        help=f"comma-separated, among {', '.join(CANDIDATES)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"--candidates: unknown {', '.join(unknown)}; expected among {', '.join(CANDIDATES)}")
    base = configs.TrainConfig(dataset=args.dataset, model=args.model, epochs=args.epochs, limit_batches=args.limit_batches,
                                batch_size=args.batch_size, lr_step=args.lr_step, seed=args.seed)
    configs.check_config(base)
    splits = build.load_data(base)
    device = torch.device(base.device)
    lines = [f"Dropout-phase candidates, {args.dataset} / {base.model}, seed {args.seed}, {args.epochs} epochs of "
             f"{args.limit_batches} batches of {args.batch_size}, learning rate /10 every {args.lr_step} epochs, "
             f"state frozen at the end of epoch {configs.freeze_by(base)}. Validation only; BatchNorm "
             f"statistics re-estimated per row on {base.bn_calibration} training images.", "",
             "| candidate | val top-1 % EDropout(F) | val top-1 % EDropout(P) | R % | state changes per epoch "
             "| ever kept at the freeze | diversity at the freeze |", "|---|---:|---:|---:|---|---:|---:|"]
    for name in names:
        config = configs.TrainConfig(**{**asdict(base), **CANDIDATES[name]})
        config.run_dir = str(args.out_dir / name)
        run_dir = Path(config.run_dir)
        if not (run_dir / "config.json").is_file():  # else kept or resumed
            run_dir = rundir.create_run_dir(config)
        else:  # resumed: the temporary files of writes a kill interrupted go
            rundir.remove_leftovers(run_dir)
        loop.train_loop(config, run_dir, splits, device, quiet=True)
        metrics = rundir.read_metrics(run_dir)
        at_freeze = next((m for m in metrics if m["frozen"]), metrics[-1])
        row = validation_rows(run_dir, splits, device)
        changes = ", ".join(str(m["best_changes"]) for m in metrics if m["epoch"] <= at_freeze["epoch"])
        lines.append(f"| {name} | {row['F']:.2f} | {row['P']:.2f} | {row['R']:.1f} | {changes} "
                     f"| {at_freeze['ever_kept']:.3f} | {at_freeze['diversity']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
