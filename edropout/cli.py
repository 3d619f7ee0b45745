"""The ``edropout`` command.

    python -m edropout train [options]     train (EDropout on digits with a small schedule by default)
    python -m edropout train --resume RUN_DIR
    python -m edropout eval RUN_DIR        re-evaluate best.pt on the test set and print the report
    python -m edropout export RUN_DIR      write slim.pt (slimmed network, edropout.load_slim) and slim.ts (TorchScript)
    torchrun --nproc_per_node N -m edropout train [options]     the same on N processes (DDP)

Without ``--config``, ``train`` starts from a small schedule (``SMALL``: ResNet-18 at 32x32, 15 epochs,
batch 64, the state free to freeze from epoch 8 after 50 unchanged steps, the learning rate divided by 10
at epoch 12), which finishes in about a minute on a 2-core CPU. ``--config FILE`` starts from the
TrainConfig fields of a JSON file instead (the seed's schedule for fields it leaves out), and options
given on the command line override either. Bad input prints one line on stderr and exits with code 2; a
process of a multi-process job that loses the others (one died or stopped answering for ``--dist-timeout``
seconds) prints one line naming its rank and exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .distributed import ProcessGroupFailure, RanksDisagree
from .train import RunError, TrainConfig

SMALL = dict(epochs=15, batch_size=64, freeze_after=8, patience=50, lr_step=12)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        sys.stderr.write(f"edropout: {message}\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edropout", description="EDropout: energy-based dropout and pruning.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a network (EDropout on digits with a small schedule by default)")
    # (flag, type, help); every TrainConfig field has one. "default": without --config; "seed": the seed's
    # schedule, TrainConfig's defaults, which --config FILE starts from.
    options = (
        ("--dataset", str, "fashion, kuzushiji, cifar10, cifar100, flowers, imagefolder or digits (default digits)"),
        ("--data-root", str, "folder of the data sets (default data)"),
        ("--download", bool, "download missing torchvision data sets into --data-root"),
        ("--model", str, "resnet18, resnet34, resnet50, resnet101, alexnet or squeezenet1_1 (default resnet18)"),
        ("--mode", str, "edropout, original (no EDropout) or random (a random fixed state) (default edropout)"),
        ("--compare-original", bool, "also train mode original with the same seed and schedule in "
                                     "RUN_DIR/original; the report adds Original and Magnitude (Original, post-hoc)"),
        ("--original-dir", str, "compare with this finished run of mode original (same data, network, seed and "
                                "schedule; with --runs, a directory of them, seed-<s>/) instead of training one "
                                "in RUN_DIR/original; implies --compare-original"),
        ("--baselines", str, "comma-separated sibling runs in RUN_DIR/<name>: scratch (a random state of "
                             "EDropout's per-layer widths, trained from scratch) and finetune (the Original "
                             "pruned by magnitude to those widths, then fine-tuned; implies --compare-original)"),
        ("--finetune-epochs", int, "baseline finetune: epochs of fine-tuning "
                                   "(default: a fifth of --epochs, at least 1)"),
        ("--finetune-lr", float, "baseline finetune: its constant learning rate (default: the schedule's second, --lr times "
                                 "--lr-gamma, chosen on validation)"),
        ("--epochs", int, "training epochs (default 15; seed's schedule 200)"),
        ("--batch-size", int, "batch size (default 64; seed's schedule 128)"),
        ("--optimizer", str, "adadelta or sgd (momentum, Nesterov) (default adadelta)"),
        ("--lr", float, "learning rate (default 1.0 for adadelta, 0.1 for sgd)"),
        ("--rho", float, "Adadelta's rho (default 0.9)"),
        ("--eps", float, "Adadelta's eps (default 1e-6)"),
        ("--momentum", float, "SGD's momentum (default 0.9)"),
        ("--weight-decay", float, "weight decay (default 1e-5)"),
        ("--lr-step", int, "StepLR: epochs between two decays of the learning rate (default 12; seed's schedule 50)"),
        ("--lr-gamma", float, "StepLR: factor of each decay (default 0.1)"),
        ("--population", int, "candidate states K, at least 4 (default 8)"),
        ("--p-init", float, "probability that a unit is kept in the initial states, in (0, 1] (default 0.5)"),
        ("--energy", str, "ising (Ising energy, refreshed every --refresh-every steps) or loss (energy loss on "
                          "each batch) (default ising)"),
        ("--refresh-every", int, "ising: steps between two refreshes of its fields and couplings (default 100)"),
        ("--keep-rate", float, "every state keeps this fraction of the prunable units, in (0, 1] "
                               "(default: none, the energy decides)"),
        ("--freeze-after", int, "epoch from which the state may freeze (default 8; seed's schedule 100)"),
        ("--patience", int, "steps without a change of the best state that freeze it (default 50; seed's schedule 100)"),
        ("--freeze-by", int, "the epoch at whose end the state freezes whatever happens; 0: none "
                             "(default: half of --epochs)"),
        ("--evolution", str, "the evolution's mutation rule: edropout (the EDropout reference code's; a converged "
                             "population keeps exploring) or classic (binary differential evolution) (default edropout)"),
        ("--mutation", float, "the evolution's mutation probability (default 0.1)"),
        ("--applied", str, "the state applied until the freeze: best (the population's best), sample (a member "
                           "drawn at each step) or anneal (a drawn member with probability 1 - epoch / --freeze-by, "
                           "else the best) (default best)"),
        ("--bn-calibration", int, "report: training images on which each row re-estimates its BatchNorm "
                                  "statistics; 0 keeps those of training (default 2048)"),
        ("--seed", int, "seed of the initial weights, data order, validation split, states and evolution "
                        "(default 0)"),
        ("--device", str, "cpu or cuda (default: cuda when available)"),
        ("--num-workers", int, "data loader worker processes (default 0)"),
        ("--run-dir", str, "run directory (default runs/<dataset>-<model>-<mode>-<time>)"),
        ("--limit-batches", int, "at most this many training batches per epoch (quick checks; default: all)"),
        ("--dist-timeout", int, "several processes (torchrun): seconds a process waits for the others before it "
                                "fails (default 600)"),
    )
    for flag, kind, help_text in options:
        if kind is bool:
            t.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            t.add_argument(flag, type=kind, default=None, help=help_text)
    t.add_argument("--runs", type=int, default=1, help="runs with seeds seed..seed+runs-1 in RUN_DIR/seed-<s>, "
                                                        "reported as mean ± std (default 1)")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR (or every run of a directory of --runs N)")
    t.add_argument("--config", metavar="FILE", default=None,
                   help="start from the TrainConfig fields of a JSON file (the seed's schedule for the others)")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    e = sub.add_parser("eval", help="re-evaluate best.pt of a run on the test set and print the report")
    e.add_argument("run_dir", help="a run directory, or a directory of runs (seed-*/) to report as mean ± std")
    e.add_argument("--device", default=None, help="cpu or cuda (default: the run's)")
    e.add_argument("--bn-calibration", type=int, default=None, metavar="N",
                   help="training images for each row's BatchNorm statistics, 0: those of training "
                        "(default: the run's)")
    x = sub.add_parser("export", help="write slim.pt and slim.ts of a run's best.pt")
    x.add_argument("run_dir", help="a run directory")
    return p


def config_of(args) -> TrainConfig:
    if args.config is not None:
        try:
            values = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"--config {args.config}: unreadable JSON ({type(e).__name__})") from None
        if not isinstance(values, dict):
            raise RunError(f"--config {args.config}: expected a JSON object of TrainConfig fields")
        values = dict(values)
    else:
        values = dict(SMALL)
    for key in (f.name for f in fields(TrainConfig)):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    try:
        return TrainConfig.from_dict(values)
    except TypeError as e:
        raise RunError(f"config: {e}") from None


def run(args) -> int:
    from . import train as training

    if args.command == "train":
        if args.resume is not None and training.holds_runs(args.resume):
            training.resume_runs(args.resume, args.device, args.dist_timeout, quiet=args.quiet)
        elif args.resume is not None:
            run_dir = Path(args.resume)
            config = training.read_config(run_dir)
            if args.device is not None:
                config.device = args.device
            if args.dist_timeout is not None:
                config.dist_timeout = args.dist_timeout
            training.train(config, resume=run_dir, quiet=args.quiet)
        else:
            config = config_of(args)
            training.train_runs(config, args.runs, quiet=args.quiet)
        return 0
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if args.command == "eval":
        if training.seed_dirs(run_dir) and not (run_dir / "best.pt").exists():
            training.aggregate(run_dir, reevaluate=True, device=args.device, bn_calibration=args.bn_calibration)
        else:
            training.report(run_dir, device=args.device, bn_calibration=args.bn_calibration)
        return 0
    files = training.export(run_dir)
    for name, path in files.items():
        print(path)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.stderr.write(f"edropout: {e}\n")
        return 2
    except (ProcessGroupFailure, RanksDisagree) as e:
        sys.stderr.write(f"edropout: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("edropout: interrupted; resume with --resume RUN_DIR\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
