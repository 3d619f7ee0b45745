"""Validation top-1 of the finetune baseline at several fine-tuning learning rates, to choose one on
validation (never on the test set).

    python benchmarks/finetune_lr.py RUN_DIR [--lrs 1,0.1,0.01,0.001] [--out FILE.md]

RUN_DIR is a finished EDropout run with an Original (``--compare-original`` or ``--baselines finetune``);
for each learning rate the finetune baseline is trained in RUN_DIR/finetune-lr<x>/ exactly as
``--baselines finetune --finetune-lr x`` would train it (a directory already there is resumed or kept), and
only its validation top-1 per epoch is read: nothing here touches the test set.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from edropout.experiments import build, config as configs, kinds, loop, rundir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--lrs", default="1,0.1,0.01,0.001", help="comma-separated learning rates")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        parser.error(f"--lrs: expected comma-separated numbers; got {args.lrs!r}")
    config = rundir.read_config(args.run_dir)
    if not config.compare_original:
        parser.error(f"{args.run_dir}: a run without an Original (train it with --compare-original)")
    splits = build.load_data(config)
    device = torch.device(config.device)
    lines = [f"Finetune baseline of {args.run_dir} (seed {config.seed}): validation top-1 % per fine-tuning "
             f"learning rate, {configs.finetune_epochs(config)} epoch(s) each.", "",
             "| lr | best val top-1 % | last val top-1 % |", "|---:|---:|---:|"]
    for lr in lrs:
        sub = kinds.sibling_config(replace(config, finetune_lr=lr), args.run_dir, "finetune")
        sub.run_dir = str(args.run_dir / f"finetune-lr{lr:g}")
        run_dir = Path(sub.run_dir)
        if not (run_dir / "config.json").is_file():  # else kept or resumed
            run_dir = rundir.create_run_dir(sub)
        else:  # resumed: the temporary files of writes a kill interrupted go
            rundir.remove_leftovers(run_dir)
        loop.train_loop(sub, run_dir, splits, device, quiet=True)
        metrics = rundir.read_metrics(run_dir)
        lines.append(f"| {lr:g} | {max(m['val_top1'] for m in metrics):.2f} | {metrics[-1]['val_top1']:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
