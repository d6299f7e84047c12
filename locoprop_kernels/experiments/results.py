"""What the autoencoder experiment's table and figure share: the official log and how runs
are compared. A module of its own so that ``autoencoder`` (the CLI) and ``plot`` both import
it and neither imports the other.
"""
from __future__ import annotations

OFFICIAL_LOG = {"epochs": [2, 3, 5, 10, 14], "train_loss": [122.7, 80.7, 65.2, 58.7, 57.0],
                "init": 547.2,
                "source": "google-research locoprop/locoprop_training.ipynb (TF1, MNIST)"}


def best_runs(runs: list) -> dict:
    """name -> the run of that optimizer with the lowest final training loss."""
    best = {}
    for r in runs:
        if not r["epochs"] or r["status"] != "ok":
            continue
        final = r["epochs"][-1]["train_loss"]
        if r["name"] not in best or final < best[r["name"]]["epochs"][-1]["train_loss"]:
            best[r["name"]] = r
    return best


def full_mnist(result: dict) -> bool:
    """Whether the official log is comparable: all 60000 MNIST training images."""
    return result["dataset"] == "mnist" and result["train_size"] == 60000
