"""The report of a run on the test set: one row per network and state, written to report.md and report.json.

Rows of an EDropout run: EDropout(F) (every unit) and EDropout(P) (its frozen state); Random 25/50/75%
and Magnitude (post-hoc: a state chosen by a criterion, nothing trained again); with the Original run,
Original and Magnitude (Original, post-hoc); with the baselines, each one's row (its own run's weights and
state; :mod:`edropout.experiments.kinds`). R is the percentage of trainable parameters that still act, #p
their number (:func:`edropout.slim.kept_parameters`), units % the prunable units kept. Before each row BatchNorm statistics are re-estimated
on training images with that row's state (``calibrated_batchnorm``). ``aggregate`` gives mean ± std over
the runs of several seeds.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..controller import EDropout
from ..criteria import Magnitude, Random
from ..slim import slim, slim_and_kept_parameters
from . import data
from .build import load_data, open_run
from .config import RunError, check_bn_calibration
from .costs import inference_flops, run_cost
from .kinds import BASELINES, KINDS, baseline_names
from .loop import evaluate
from .plots import compare
from .rundir import (load_checkpoint, original_path, read_config, read_metrics, restore, seed_dirs, strict_json,
                     write_text)

RANDOM_KEPT = (25, 50, 75)  # the random-pruning rows of the report: % of prunable units kept
COLUMNS = (("loss", "loss", "{:.4f}"), ("top1", "top-1 %", "{:.2f}"), ("top3", "top-3 %", "{:.2f}"),
           ("top5", "top-5 %", "{:.2f}"), ("R", "R %", "{:.2f}"), ("params", "#p", "{:,.0f}"),
           ("units", "units %", "{:.1f}"),
           ("mflops", "MFLOPs/img", "{:,.1f}"), ("train_s", "train s", "{:,.0f}"),
           ("train_tflops", "train TFLOPs", "{:,.1f}"))


def calibration_batch_size(size: int, images: int) -> int:
    """Batches of up to 128 of a training set of ``size`` images, for ``images`` of them."""
    return max(1, min(128, size, images))


def calibration_loader(dataset, images: int) -> DataLoader:
    """Training images in a fixed random order, in whole batches of up to 128 (a short last batch would
    weigh as much as a full one in the average): ``calibration_count`` of them."""
    return DataLoader(dataset, batch_size=calibration_batch_size(len(dataset), images), shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def calibration_count(size: int, images: int) -> int:
    """How many of a training set of ``size`` images ``calibrated_batchnorm`` reads for ``images``."""
    if images <= 0:
        return 0
    batch_size = calibration_batch_size(size, images)
    return min(-(-images // batch_size), size // batch_size) * batch_size


@contextlib.contextmanager
def calibrated_batchnorm(model: nn.Module, dataset, images: int, device, ed: Optional[EDropout] = None):
    """Within the context, ``model``'s BatchNorm layers use running statistics re-estimated (an equal-weight
    average over batches) on ``images`` training images, the network running as it does when the context is
    entered (with whatever state is applied); the statistics of training are restored on exit.

    Statistics gathered in training describe the network as it was trained, with its masks. A row of the
    report that applies another state (every unit, a random or magnitude state) changes what each
    BatchNorm sees; without re-estimating, its running statistics are those of another network (EDropout(F)
    scored chance on digits that way). ``images`` = 0 keeps the training statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if images <= 0 or not norms:
        yield
        return
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in norms]
    was_training = model.training
    try:
        model.eval()  # dropout layers stay off; only the BatchNorm layers gather statistics
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        # the units' activity is a training statistic: these forwards record none
        with torch.no_grad(), (ed.no_activity() if ed is not None else contextlib.nullcontext()):
            for inputs, _ in calibration_loader(dataset, images):
                model(inputs.to(device))
                seen += inputs.shape[0]
                if seen >= images:
                    break
        model.eval()
        yield
    finally:
        for m, (mean, var, count, momentum) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
        model.train(was_training)


def _row(name: str, metrics: dict, percent: float, params: int, units: float, flops: int, cost: dict) -> dict:
    """A report row: test metrics, R, #p and the % of prunable units kept, inference FLOPs of its network per
    image, and the training cost (steps only) of the runs that produced it."""
    return {"method": name, "loss": metrics["loss"], "top1": metrics["top1"], "top3": metrics["top3"],
            "top5": metrics["top5"], "R": percent, "params": params, "units": units, "mflops": flops / 1e6,
            "train_s": _number(cost["train_time"]), "train_tflops": _number(cost["train_flops"] / 1e12)}


def _number(value: float) -> Optional[float]:
    """``value``, or None where it is NaN (JSON has no NaN)."""
    return None if value != value else value


def _nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _cost(*run_dirs) -> dict:
    """The training cost of the runs in ``run_dirs`` together (a fine-tuned network: the Original's and its own)."""
    costs = [run_cost(read_metrics(d)) for d in run_dirs]
    return {key: sum(c[key] for c in costs) for key in costs[0]}


def evaluate_run(run_dir, splits: Optional[data.Splits] = None, device=None,
                 bn_calibration: Optional[int] = None) -> List[dict]:
    """The report's rows (module docstring) for best.pt of ``run_dir`` on the test set; a baseline's run
    gives its one row. ``bn_calibration``: training images per row for BatchNorm statistics (None: the
    run's config)."""
    run_dir = Path(run_dir)
    if bn_calibration is not None:
        check_bn_calibration(bn_calibration)
    config, checkpoint, model, ed = open_run(run_dir, device)
    calibration = config.bn_calibration if bn_calibration is None else bn_calibration
    splits = splits or load_data(config)
    meta = checkpoint["meta"]
    if (meta["in_channels"], meta["num_classes"]) != (splits.in_channels, splits.num_classes):
        raise RunError(f"{run_dir / 'best.pt'}: a network for {meta['in_channels']} channel(s) and "
                       f"{meta['num_classes']} classes, the data has {splits.in_channels} and {splits.num_classes}")
    loader = DataLoader(splits.test, batch_size=256, num_workers=config.num_workers)
    device = torch.device(config.device)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    example = splits.test[0][0].unsqueeze(0).to(device)
    full_flops = inference_flops(slim(model, torch.ones(ed.units.num_units), ed.units) if ed is not None else model,
                                 example)
    own = _cost(run_dir)

    def measure():  # the network as it runs now (masks applied or not), its own BatchNorm statistics
        with calibrated_batchnorm(model, splits.train, calibration, device, ed):
            return evaluate(model, loader, device)

    if ed is None:
        return [_row("Original", measure(), 100.0, total, 100.0, full_flops, own)]
    prunable = ed.prunable.bool().cpu()

    def state_row(name, state, cost):
        with ed.applying(state):
            small, percent, kept = slim_and_kept_parameters(ed.model, ed.state, ed.units)  # one slimming for both
            units = 100.0 * float((ed.state.cpu().bool() & prunable).sum()) / max(1, int(prunable.sum()))
            flops = inference_flops(small, example)
            return _row(name, measure(), percent, kept, units, flops, cost)

    kind = KINDS[config.mode]
    if kind.row is not None:  # a baseline; one from the Original cost the Original's training too
        parent = run_dir.parent
        cost = _cost(original_path(read_config(parent), parent), run_dir) if kind.from_original else own
        return [state_row(kind.row, ed.state.cpu().clone(), cost)]
    label = kind.label.format(p_init=config.p_init)
    rows = {}
    with ed.full():
        rows[f"{label}(F)"] = _row(f"{label}(F)", measure(), 100.0, total, 100.0, full_flops, own)
    state = ed.state.cpu().clone()
    rows[f"{label}(P)"] = state_row(f"{label}(P)", state, own)
    if kind.search == "edropout":  # states chosen afterwards from its network
        for percent in RANDOM_KEPT:
            name = f"Random {percent}% (post-hoc)"
            rows[name] = state_row(name, Random(config.seed).fraction(ed.units, percent), own)
        rows["Magnitude (post-hoc)"] = state_row("Magnitude (post-hoc)", Magnitude().state(ed.units, state), own)
    original = original_path(config, run_dir)
    if original is not None:
        restore(load_checkpoint(original / "best.pt", config.device), model, None, path=original / "best.pt")
        with ed.full():
            rows["Original"] = _row("Original", measure(), 100.0, total, 100.0, full_flops, _cost(original))
        name = "Magnitude (Original, post-hoc)"
        rows[name] = state_row(name, Magnitude().state(ed.units, state), _cost(original))
    for baseline in baseline_names(config):  # their own weights and fixed states
        path = run_dir / baseline / "best.pt"
        restore(load_checkpoint(path, config.device), model, ed, path=path)
        cost = _cost(original, run_dir / baseline) if KINDS[baseline].from_original else _cost(run_dir / baseline)
        rows[BASELINES[baseline]] = state_row(BASELINES[baseline], ed.state.cpu().clone(), cost)
    first = ["Original", f"{label}(F)", f"{label}(P)", *BASELINES.values()]
    return [rows[name] for name in first if name in rows] + [row for name, row in rows.items() if name not in first]


def format_table(rows: List[dict], spread: Optional[List[dict]] = None) -> str:
    """A markdown table of report rows (with ± std when ``spread`` gives the rows' standard deviations)."""
    lines = ["| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for i, row in enumerate(rows):
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            if value is None or value != value:  # not recorded (runs written before the costs were)
                cells.append("n/a")
                continue
            cell = fmt.format(value)
            if spread is not None:
                cell += " ± " + fmt.format(spread[i][key])
            cells.append(cell)
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(run_dir, splits: Optional[data.Splits] = None, device=None, quiet: bool = False,
           bn_calibration: Optional[int] = None) -> dict:
    """Evaluate best.pt on the test set, write report.md and report.json, print the table; returns the report.
    ``bn_calibration``: training images per row for BatchNorm statistics (None: the run's config)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    splits = splits or load_data(config)
    rows = evaluate_run(run_dir, splits, device, bn_calibration)
    calibration = calibration_count(len(splits.train), config.bn_calibration if bn_calibration is None
                                    else bn_calibration)
    metrics = read_metrics(run_dir)
    if not metrics:
        raise RunError(f"{run_dir / 'metrics.jsonl'}: missing or empty (the run's record of its epochs)")
    epoch = load_checkpoint(run_dir / "best.pt")["epoch"]
    best = next((m for m in metrics if m["epoch"] == epoch), None)
    result = {"run_dir": str(run_dir), "dataset": config.dataset, "model": config.model, "mode": config.mode,
              "seed": config.seed, "epochs": len(metrics), "best_epoch": best["epoch"] if best else None,
              "best_val_top1": best["val_top1"] if best else None, "bn_calibration": calibration, "rows": rows}
    siblings = ([f"Original: best.pt of {original_path(config, run_dir)}"] if config.compare_original else []) + \
        [f"{BASELINES[name]}: best.pt of {name}/" for name in baseline_names(config)]
    original = "".join(f"; {text}" for text in siblings)
    heading = (f"# {config.dataset} / {config.model} / {config.mode} (seed {config.seed})\n\n"
               f"Test set, best.pt (epoch {result['best_epoch']} of {metrics[-1]['epoch']}, validation top-1 "
               f"{result['best_val_top1']:.2f} %{original}). " + calibration_note(calibration))
    write_report(run_dir, result, heading, format_table(rows), quiet)
    return result


def write_report(run_dir: Path, result: dict, heading: str, table: str, quiet: bool) -> None:
    """report.json (``result``), report.md (``heading``, the legend and ``table``; printed unless ``quiet``)
    and compare.png (:func:`edropout.experiments.plots.compare`)."""
    notes = cost_notes({row["method"] for row in result["rows"]})
    text = (f"{heading} R: % of trainable parameters kept; #p: their number; units %: the prunable units kept; "
            f"MFLOPs/img: inference FLOPs of the (slim) network per image; train s, train TFLOPs: the training "
            f"steps' seconds and FLOPs of the runs that produced the row.{notes}\n\n{table}\n")
    if not quiet:  # printed first: a folder that cannot be written to still shows the result
        print(text)
    write_text(run_dir / "report.md", text)
    compare(run_dir, result)
    write_text(run_dir / "report.json", strict_json(result, indent=2) + "\n")  # last: it marks the run finished


def cost_notes(methods) -> str:
    """What the cost of the rows in ``methods`` leaves out or adds (sentences, '' when nothing)."""
    notes = ""
    if "Random (scratch)" in methods:
        notes += (" Random (scratch) borrows EDropout's per-layer widths: its cost is its own training alone, "
                  "without the EDropout run that found them.")
    from_original = [row for name, row in BASELINES.items() if KINDS[name].from_original and row in methods]
    if from_original:
        notes += f" {' and '.join(from_original)}: the Original's training and their own."
    return notes


def calibration_note(images: int) -> str:
    if images == 0:
        return "BatchNorm statistics as gathered in training."
    return f"BatchNorm statistics re-estimated for each row (its own state) on {images} training images."


def aggregate(parent, quiet: bool = False, reevaluate: bool = False, device=None,
              bn_calibration: Optional[int] = None, left_out: Optional[dict] = None) -> dict:
    """Mean ± std (over seeds) of the report rows of each run under ``parent``; writes report.md/json.
    ``left_out``: seeds whose runs did not finish (diverged), by seed, left out and named in the heading."""
    parent = Path(parent)
    left_out = left_out or {}
    reports = []
    for sub in seed_dirs(parent):
        if int(sub.name.split("-", 1)[1]) in left_out:
            continue
        if reevaluate or not (sub / "report.json").is_file():
            reports.append(report(sub, device=device, quiet=True, bn_calibration=bn_calibration))
        else:
            reports.append(json.loads((sub / "report.json").read_text()))
    if not reports:
        raise RunError(f"{parent}: no finished runs (seed-*/)")
    methods = [row["method"] for row in reports[0]["rows"]]
    for r in reports[1:]:
        if [row["method"] for row in r["rows"]] != methods:
            raise RunError(f"{parent}: the runs' reports have different rows (seed {reports[0]['seed']}: "
                           f"{', '.join(methods)}; seed {r['seed']}: {', '.join(row['method'] for row in r['rows'])})")
    mean, std = [], []
    for i, row in enumerate(reports[0]["rows"]):
        values = {key: torch.tensor([_nan(r["rows"][i].get(key)) for r in reports], dtype=torch.float64)
                  for key, _, _ in COLUMNS}
        mean.append({"method": row["method"], **{k: _number(float(v.mean())) for k, v in values.items()}})
        std.append({"method": row["method"], **{k: _number(float(v.std(unbiased=False))) for k, v in values.items()}})
    seeds = [r["seed"] for r in reports]
    result = {"run_dir": str(parent), "seeds": seeds, "rows": mean, "std": std, "runs": reports,
              "diverged": sorted(left_out)}
    heading = (f"# {reports[0]['dataset']} / {reports[0]['model']} / {reports[0]['mode']}: {len(reports)} runs "
               f"(seeds {', '.join(map(str, seeds))})\n\nTest set, best.pt of each run, mean ± std over runs. "
               + (f"Seed(s) {', '.join(map(str, left_out))} diverged and are left out. " if left_out else "")
               + calibration_note(reports[0].get("bn_calibration", 0)))
    write_report(parent, result, heading, format_table(mean, std), quiet)
    return result
