"""Variants of the pruned phase compared on validation, each branching from the moment of the freeze of the
same EDropout runs: to choose ``--lr-after-freeze`` (never on the test set).

    python benchmarks/after_freeze.py RUNS_DIR [--candidates continue,restart,restart-reset] [--out FILE.md]

RUNS_DIR is an EDropout run or a directory of them (seed-*/), each with the freeze.pt it wrote at its
freeze. A candidate the run itself used is read from the run as it is; for each other one, RUNS_DIR/
after-freeze/<candidate>/<run>/ is a copy of the run at its freeze (config.json with ``lr_after_freeze``
set, the metrics of the epochs before, last.pt = freeze.pt) trained on from there by ``--resume``: each
candidate costs the pruned phase only. The frozen state is the same for every candidate of a run (its hash
is checked). The table: validation top-1 of EDropout(P), at its best epoch after the freeze (best.pt, the
report's choice) and at the last epoch, per run and as mean ± std.
"""

import argparse
import hashlib
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

from edropout.experiments import config as configs, rundir, runs

CANDIDATES = configs.LR_AFTER_FREEZE


def state_hash(run_dir: Path) -> str:
    """A short hash of the frozen state in last.pt."""
    state = torch.load(run_dir / "last.pt", weights_only=True)["edropout"]["mask"].to(torch.uint8)
    return hashlib.sha256(state.cpu().numpy().tobytes()).hexdigest()[:12]


def branch(run_dir: Path, out: Path, candidate: str) -> Path:
    """``out``: a copy of ``run_dir`` at its freeze with ``lr_after_freeze`` = ``candidate`` (kept if there)."""
    if not (out / "config.json").is_file():
        freeze = torch.load(run_dir / "freeze.pt", weights_only=True)
        out.mkdir(parents=True, exist_ok=True)
        values = {**rundir.config_values(run_dir), "lr_after_freeze": candidate, "run_dir": str(out)}
        rundir.write_metrics(out, [m for m in rundir.read_metrics(run_dir) if m["epoch"] <= freeze["epoch"]])
        shutil.copyfile(run_dir / "freeze.pt", out / "last.pt")
        rundir.write_text(out / "config.json", json.dumps(values, indent=2) + "\n")
    if not (out / "report.json").is_file():
        runs.resume(out, quiet=True)
    return out


def after_freeze(run_dir: Path) -> dict:
    """Validation top-1 of the epochs after the freeze: the best (best.pt's) and the last."""
    frozen = [m["val_top1"] for m in rundir.read_metrics(run_dir) if m["frozen"]]
    return {"best": max(frozen), "last": frozen[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        parser.error(f"--candidates: unknown {', '.join(unknown)}; expected among {', '.join(CANDIDATES)}")
    seeds = rundir.seed_dirs(args.runs_dir) or [args.runs_dir]
    for run_dir in seeds:
        if not (run_dir / "freeze.pt").is_file():
            parser.error(f"{run_dir}: no freeze.pt (a run that froze, written since freeze.pt exists)")

    results = {c: {} for c in candidates}
    for run_dir in seeds:
        own = rundir.read_config(run_dir).lr_after_freeze
        hashes = set()
        for candidate in candidates:
            done = run_dir if candidate == own else branch(run_dir, args.runs_dir / "after-freeze" / candidate /
                                                           run_dir.name, candidate)
            hashes.add(state_hash(done))
            results[candidate][run_dir.name] = after_freeze(done)
        if len(hashes) != 1:
            raise SystemExit(f"{run_dir}: the candidates' frozen states differ ({', '.join(sorted(hashes))})")
        print(f"{run_dir.name}: frozen state {hashes.pop()} in every candidate")

    names = [d.name for d in seeds]
    lines = ["| after the freeze | " + " | ".join(f"{n} best / last" for n in names) + " | best, mean ± std |",
             "|---|" + "---:|" * (len(names) + 1)]
    for candidate in candidates:
        r = results[candidate]
        best = [r[n]["best"] for n in names]
        cells = [f"{r[n]['best']:.2f} / {r[n]['last']:.2f}" for n in names]
        lines.append(f"| {candidate} | " + " | ".join(cells) + f" | {statistics.mean(best):.2f} ± "
                     f"{statistics.pstdev(best):.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
