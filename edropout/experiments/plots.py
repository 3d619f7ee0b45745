"""A run's figures: plots.png (its metrics.jsonl, epoch by epoch) and compare.png (its report's rows: accuracy
against cost)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .config import RunError
from .rundir import atomic_write_bytes, read_config, read_metrics


def _pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(run_dir) -> Optional[Path]:
    """plots.png: per epoch, loss, top-1, best and mean population energy, the kept and ever-kept fractions,
    the changes of the applied state and the population's diversity (None without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    epochs = [m["epoch"] for m in metrics]
    frozen = next((m["epoch"] for m in metrics if m.get("frozen")), None)
    series = lambda key: [np.nan if m.get(key) is None else m[key] for m in metrics]  # noqa: E731
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax, keys, title in ((axes[0, 0], ("train_loss", "val_loss"), "loss"),
                            (axes[0, 1], ("train_top1", "val_top1"), "top-1 %"),
                            (axes[0, 2], ("best_energy", "mean_energy"), "population energy"),
                            (axes[1, 0], ("kept", "ever_kept"), "fraction of the prunable units"),
                            (axes[1, 1], ("best_changes",), "steps at which the applied state changed"),
                            (axes[1, 2], ("diversity",), "population diversity (mean pairwise Hamming)")):
        for key in keys:
            ax.plot(epochs, series(key), marker=".", label=key.replace("_", " "))
        if frozen is not None and any(m.get("frozen") is False for m in metrics):  # frozen during the run
            ax.axvline(frozen, color="gray", linestyle="--", linewidth=1, label=f"frozen in epoch {frozen}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    try:
        config = read_config(run_dir)
        fig.suptitle(f"{run_dir.name}: {config.mode}, {config.model} on {config.dataset}, seed {config.seed}")
    except RunError:
        fig.suptitle(run_dir.name)
    fig.tight_layout()
    try:
        atomic_write_bytes(run_dir / "plots.png", lambda f: fig.savefig(f, format="png", dpi=100))
    finally:  # a write that failed leaves no figure open
        plt.close(fig)
    return run_dir / "plots.png"


def compare(run_dir, result: dict) -> Optional[Path]:
    """compare.png: the test top-1 of each row of a report (``result``, report.json's content) against the
    training time and FLOPs of the runs that made it and against R, with ± std over seeds when the report
    has them (an aggregate). Left out, as they are in the table: post-hoc rows (a state chosen afterwards,
    nothing trained for it) and "(F)" rows (every unit put back into a pruned network: a diagnostic, not a
    network one would deploy). None without matplotlib or without a row to show."""
    plt = _pyplot()
    if plt is None:
        return None
    std = result.get("std") or [{} for _ in result["rows"]]
    shown = [(row, spread) for row, spread in zip(result["rows"], std)
             if "post-hoc" not in row["method"] and not row["method"].endswith("(F)")]
    if not shown:
        return None
    run_dir = Path(run_dir)
    value = lambda row, key: np.nan if row.get(key) is None else row[key]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), sharey=True)
    for ax, key, title in ((axes[0], "train_s", "training time (s)"), (axes[1], "train_tflops", "training TFLOPs"),
                           (axes[2], "R", "R: % of the parameters kept")):
        for i, (row, spread) in enumerate(shown):
            ax.errorbar(value(row, key), value(row, "top1"), xerr=value(spread, key) if spread else None,
                        yerr=value(spread, "top1") if spread else None, fmt="o", color=f"C{i % 10}", capsize=3,
                        label=row["method"])
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 %")
    seeds = f", mean ± std over {len(result['seeds'])} seeds" if result.get("seeds") else ""
    fig.suptitle(f"{run_dir.name}: each trained network's test top-1 against what it cost{seeds} "
                 f"(post-hoc and (F) rows: in the table)")
    axes[2].legend(loc="best", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write_bytes(run_dir / "compare.png", lambda f: fig.savefig(f, format="png", dpi=100))
    finally:  # a write that failed leaves no figure open
        plt.close(fig)
    return run_dir / "compare.png"
