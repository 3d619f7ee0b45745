"""Does EDropout pay for itself? Per seed of a directory of runs (``edropout train --runs N
--compare-original --baselines ...``): EDropout(P) against each control row of the report, and the
training cost of the runs behind each, from the runs' report.json (test set) and metrics.jsonl.

    python benchmarks/paid_for.py RUN_DIR [--out FILE.md]

The goal: EDropout(P) above each control in every seed, at equal or lower training cost (seconds and
FLOPs of the training steps, as the report counts them: the Original's included for the rows made from
it); and the EDropout run's training FLOPs and time at most 0.8 × the Original's, per seed.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from edropout.experiments import rundir
from edropout.experiments.costs import run_cost

CONTROLS = ("Original", "Random (scratch)", "Uniform (scratch)", "Magnitude + fine-tune", "Magnitude + rewind",
            "Early-Bird")


def seed_rows(run_dir: Path) -> dict:
    """The report rows of one seed's run by method, with the seed and EDropout's freeze."""
    rows = {r["method"]: r for r in json.loads((run_dir / "report.json").read_text())["rows"]}
    metrics = rundir.read_metrics(run_dir)
    frozen_at = next((m["frozen_at"] for m in metrics if m["frozen"]), None)
    config = rundir.read_config(run_dir)
    original = run_cost(rundir.read_metrics(rundir.original_path(config, run_dir)))
    own = run_cost(metrics)
    return {"seed": config.seed, "rows": rows, "frozen_step": frozen_at["step"] if frozen_at else None,
            "flops_ratio": own["train_flops"] / original["train_flops"],
            "time_ratio": own["train_time"] / original["train_time"],
            "time": own["train_time"], "original_time": original["train_time"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    seeds = [seed_rows(d) for d in rundir.seed_dirs(args.run_dir) or [args.run_dir]]
    names = [name for name in CONTROLS if all(name in s["rows"] for s in seeds)]
    ids = ", ".join(str(s["seed"]) for s in seeds)
    lines = [f"EDropout(P) − each row, test top-1 (points), per seed ({ids}); each row's training cost against "
             "EDropout(P)'s (its run's), mean over seeds.", "",
             "| control | top-1 | P − control per seed | mean | smallest | train s / P's | train TFLOPs / P's | "
             "goal (above in every seed, at equal or lower cost) |", "|---|---:|---|---:|---:|---:|---:|---|"]
    verdicts = {}
    for name in names:
        differences = [s["rows"]["EDropout(P)"]["top1"] - s["rows"][name]["top1"] for s in seeds]
        time = statistics.mean(s["rows"][name]["train_s"] / s["rows"]["EDropout(P)"]["train_s"] for s in seeds)
        flops = statistics.mean(s["rows"][name]["train_tflops"] / s["rows"]["EDropout(P)"]["train_tflops"]
                                for s in seeds)
        above = all(d > 0 for d in differences)
        cheaper = all(s["rows"]["EDropout(P)"][k] <= s["rows"][name][k] for s in seeds for k in ("train_s", "train_tflops"))
        goal = "(the unpruned network, not a control of the goal)"
        if name != "Original":
            verdicts[name] = above and cheaper
            goal = ("met" if verdicts[name] else "missed") + ("" if above else ": not above in every seed") + \
                ("" if cheaper else ("; " if not above else ": ") + "P costs more")
        lines.append(f"| {name} | {statistics.mean(s['rows'][name]['top1'] for s in seeds):.2f} | "
                     f"{' / '.join(f'{d:+.2f}' for d in differences)} | {statistics.mean(differences):+.2f} | "
                     f"{min(differences):+.2f} | {time:.2f} | {flops:.2f} | {goal} |")
    lines += ["", "The EDropout run's training cost against the Original's (same schedule), per seed.", "",
              "| seed | frozen at step | EDropout(P) | R % | units % | train FLOPs / Original's | "
              "train time / Original's (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in seeds:
        p = s["rows"]["EDropout(P)"]
        lines.append(f"| {s['seed']} | {s['frozen_step']} | {p['top1']:.2f} | {p['R']:.2f} | "
                     f"{p['units'] if p.get('units') is not None else float('nan'):.1f} | {s['flops_ratio']:.3f} | "
                     f"{s['time_ratio']:.3f} ({s['time']:.0f} / {s['original_time']:.0f}) |")
    met = {**{f"above {name} at no more cost": ok for name, ok in verdicts.items()},
           "FLOPs ≤ 0.8 × the Original's per seed": all(s["flops_ratio"] <= 0.8 for s in seeds),
           "time ≤ 0.8 × the Original's per seed": all(s["time_ratio"] <= 0.8 for s in seeds)}
    text = "\n".join(lines) + "\n\nGoals: " + "; ".join(f"{k}: {'met' if v else 'missed'}" for k, v in met.items()) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
