"""The ``edropout`` command.

    python -m edropout train [options]     train (EDropout on digits with a small schedule by default)
    python -m edropout train --resume RUN_DIR
    python -m edropout eval RUN_DIR        re-evaluate best.pt on the test set and print the report
    python -m edropout export RUN_DIR      write slim.pt (slimmed network, edropout.load_slim) and slim.ts (TorchScript)
    torchrun --nproc_per_node N -m edropout train [options]     the same on N processes (DDP)

Without ``--config``, ``train`` starts from a small schedule (``config.SMALL``: ResNet-18 at 32x32, 15
epochs, batch 64, the state free to freeze from epoch 8 after 50 unchanged steps, the learning rate divided
by 10 at epoch 12), which finishes in about a minute on a 2-core CPU. Each option's help comes from its
TrainConfig field (:mod:`edropout.experiments.config`). ``--config FILE`` starts from the
TrainConfig fields of a JSON file instead (the paper's schedule for fields it leaves out), and options
given on the command line override either. Bad input prints one line on stderr and exits with code 2; a
process of a multi-process job that loses the others (one died or stopped answering for ``--dist-timeout``
seconds) prints one line naming its rank and exits with code 1, as does a run whose loss becomes
non-finite (it stops there, its last checkpoint kept, no report written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from ..distributed import ProcessGroupFailure, RanksDisagree
from .config import PRESETS, SMALL, Diverged, RunError, TrainConfig, help_text
from .data import UnreadableImage


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        sys.stderr.write(f"edropout: {message}\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = _Parser(prog="edropout", description="EDropout: energy-based dropout and pruning.")
    p.add_argument("--version", action="version", version=f"edropout {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a network (EDropout on digits with a small schedule by default)")
    for f in fields(TrainConfig):  # one option per field, its help from the field (experiments.config)
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            t.add_argument(flag, action="store_true", default=None, help=help_text(f.name))
        else:
            kind = {"int": int, "float": float}.get(f.type.replace("Optional[", "").rstrip("]"), str)
            t.add_argument(flag, type=kind, default=None, help=help_text(f.name))
    t.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="reference: the released research code's choices at once (--stem cifar --energy margin "
                        "--prunable reference --freeze reference); flags given beside it win")
    t.add_argument("--runs", type=int, default=1, help="runs with seeds seed..seed+runs-1 in RUN_DIR/seed-<s>, "
                                                        "reported as mean ± std (default 1)")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR (or every run of a directory of --runs N)")
    t.add_argument("--config", metavar="FILE", default=None,
                   help="start from the TrainConfig fields of a JSON file (the paper's schedule for the others)")
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
    values.update(PRESETS.get(args.preset, {}))
    for key in (f.name for f in fields(TrainConfig)):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    try:
        return TrainConfig.from_dict(values)
    except TypeError as e:
        raise RunError(f"config: {e}") from None


# What --resume may change: where and how the run is computed, not what is trained
RESUME_FLAGS = ("device", "dist_timeout", "num_workers")


def check_resume_flags(args) -> None:
    """RunError (one line) naming the flags given with --resume that would change the run."""
    given = [f"--{f.name.replace('_', '-')}" for f in fields(TrainConfig)
             if f.name not in RESUME_FLAGS and getattr(args, f.name) is not None]
    given += [flag for flag, value in (("--config", args.config), ("--preset", args.preset)) if value is not None]
    given += ["--runs"] if args.runs != 1 else []
    if given:
        raise RunError(f"--resume continues {args.resume} as its config.json says: {', '.join(given)} would change "
                       f"it (with --resume only --device, --num-workers, --dist-timeout and --quiet); to train "
                       f"longer or otherwise, start a new run: --config {Path(args.resume) / 'config.json'} "
                       f"--run-dir NEW_DIR and the changed flags")


def run(args) -> int:
    from . import export, report, rundir, runs

    if args.command == "train":
        if args.resume is not None:
            check_resume_flags(args)
            runs.resume(args.resume, args.device, args.dist_timeout, quiet=args.quiet, num_workers=args.num_workers)
        else:
            runs.train_runs(config_of(args), args.runs, quiet=args.quiet)
        return 0
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if args.command == "eval":
        if rundir.seed_dirs(run_dir) and not (run_dir / "best.pt").exists():
            report.aggregate(run_dir, reevaluate=True, device=args.device, bn_calibration=args.bn_calibration)
        else:
            report.report(run_dir, device=args.device, bn_calibration=args.bn_calibration)
        return 0
    for path in export.export(run_dir).values():
        print(path)
    return 0


def as_flags(message: str) -> str:
    """A message that starts with a TrainConfig field's name, with the command's flag in its place."""
    name = message.split(" ", 1)[0].rstrip(",:;")
    if name in {f.name for f in fields(TrainConfig)}:
        return "--" + name.replace("_", "-") + message[len(name):]
    return message


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # what the command can do, rather than an error
        parser().print_help(sys.stderr)
        return 2
    args = parser().parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.stderr.write(f"edropout: {as_flags(str(e))}\n")
        return 2
    except UnreadableImage as e:  # met mid-epoch (at load time it is a RunError): bad input as well
        sys.stderr.write(f"edropout: {e}\n")
        return 2
    except Diverged as e:  # every rank stops at the same step with the same line: rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"edropout: {e}\n")
        return 1
    except (ProcessGroupFailure, RanksDisagree) as e:
        sys.stderr.write(f"edropout: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("edropout: interrupted; resume with --resume RUN_DIR\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
