"""The autoencoder experiment's figure: training loss vs epoch and vs wall time.

One line per optimizer at its best learning rate (the lowest final training loss); the other
rates of a sweep are drawn thin and faint in the same colour. The official LocoProp-M log is
drawn as points on the epoch panel when the data set is MNIST.
"""
from __future__ import annotations

from pathlib import Path

from .results import OFFICIAL_LOG, best_runs, full_mnist


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on these machines
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if len(r["epochs"]) > 1]
    best = best_runs(runs)
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["name"] for r in runs))}
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        rows = r["epochs"]
        is_best = best.get(r["name"]) is r
        style = dict(color=colors[r["name"]], lw=2.0 if is_best else 0.8,
                     alpha=1.0 if is_best else 0.35, label=r["label"] if is_best else None)
        by_epoch.plot([row["epoch"] for row in rows], [row["train_loss"] for row in rows],
                      marker="o", ms=3, **style)
        by_time.plot([row["wall_s"] for row in rows], [row["train_loss"] for row in rows],
                     marker="o", ms=3, **style)
    if full_mnist(result):
        last = max(row["epoch"] for r in runs for row in r["epochs"]) if runs else 0
        shown = [(e, v) for e, v in zip(OFFICIAL_LOG["epochs"], OFFICIAL_LOG["train_loss"])
                 if e <= last]
        if shown:
            by_epoch.plot(*zip(*shown), "k*", ms=9, label="official LocoProp-M log")
    for ax, xlabel in ((by_epoch, "epoch (LocoProp: epoch 1 at lr = 0)"),
                       (by_time, "training wall time (s)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss (BCE, summed over pixels)")
        ax.grid(True, which="both", alpha=0.3)
    by_epoch.legend(fontsize=8)
    fig.suptitle(f"Deep autoencoder, {result['dataset']} ({result['train_size']} train), "
                 f"batch {result['batch']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
