"""Does EDropout pay for itself? Per seed of a directory of runs (``edropout train --runs N
--compare-original --baselines scratch``): EDropout(P) against its scratch control, and the EDropout run's
training cost against the Original's, from the runs' report.json (test set) and metrics.jsonl.

    python benchmarks/paid_for.py RUN_DIR [--out FILE.md]

The targets: EDropout(P) − Random (scratch) ≥ 0 on the mean of the per-seed differences; the EDropout
run's training FLOPs and wall time (training steps only) at most 0.8 × the Original's, per seed.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from edropout.experiments import rundir
from edropout.experiments.costs import run_cost


def seed_row(run_dir: Path) -> dict:
    rows = {r["method"]: r for r in json.loads((run_dir / "report.json").read_text())["rows"]}
    config = rundir.read_config(run_dir)
    original = rundir.original_path(config, run_dir)
    own, base = run_cost(rundir.read_metrics(run_dir)), run_cost(rundir.read_metrics(original))
    frozen_at = next((m["frozen_at"] for m in rundir.read_metrics(run_dir) if m["frozen"]), None)
    return {"seed": config.seed, "original": rows["Original"]["top1"], "P": rows["EDropout(P)"]["top1"],
            "scratch": rows["Random (scratch)"]["top1"], "R": rows["EDropout(P)"]["R"],
            "frozen_step": frozen_at["step"] if frozen_at else None,
            "flops_ratio": own["train_flops"] / base["train_flops"],
            "time_ratio": own["train_time"] / base["train_time"],
            "time": own["train_time"], "original_time": base["train_time"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    seeds = rundir.seed_dirs(args.run_dir) or [args.run_dir]
    rows = [seed_row(d) for d in seeds]
    lines = ["| seed | frozen at step | Original | EDropout(P) | Random (scratch) | P − scratch | R % | "
             "train FLOPs / Original's | train time / Original's (s) |", "|---|---:|" + "---:|" * 7]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['frozen_step']} | {r['original']:.2f} | {r['P']:.2f} | {r['scratch']:.2f} | "
                     f"{r['P'] - r['scratch']:+.2f} | {r['R']:.2f} | {r['flops_ratio']:.3f} | {r['time_ratio']:.3f} "
                     f"({r['time']:.0f} / {r['original_time']:.0f}) |")
    differences = [r["P"] - r["scratch"] for r in rows]
    mean = {key: statistics.mean(r[key] for r in rows) for key in ("original", "P", "scratch", "R", "flops_ratio",
                                                                   "time_ratio")}
    lines.append(f"| mean | | {mean['original']:.2f} | {mean['P']:.2f} | {mean['scratch']:.2f} | "
                 f"{statistics.mean(differences):+.2f} | {mean['R']:.2f} | {mean['flops_ratio']:.3f} | "
                 f"{mean['time_ratio']:.3f} |")
    met = {"accuracy (mean P − scratch ≥ 0)": statistics.mean(differences) >= 0,
           "FLOPs (≤ 0.8 per seed)": all(r["flops_ratio"] <= 0.8 for r in rows),
           "time (≤ 0.8 per seed)": all(r["time_ratio"] <= 0.8 for r in rows)}
    verdicts = "; ".join(f"{k}: {'met' if v else 'missed'}" for k, v in met.items())
    text = "\n".join(lines) + f"\n\nTargets: {verdicts}\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
