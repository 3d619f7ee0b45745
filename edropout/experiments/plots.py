"""plots.png of a run: its metrics.jsonl, epoch by epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .rundir import atomic_write_bytes, read_metrics


def plot(run_dir) -> Optional[Path]:
    """plots.png: per epoch, loss, top-1, best and mean population energy, the kept and ever-kept fractions,
    the changes of the applied state and the population's diversity (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    epochs = [m["epoch"] for m in metrics]
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
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(run_dir / "plots.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return run_dir / "plots.png"
