"""What the experiments' runs, tables and figures share: the official log, how runs are
compared, how an epoch ends. A module of its own so that ``autoencoder`` (the CLI), ``plot``
and ``classification`` import it and none imports another's internals for it.
"""
from __future__ import annotations

import math

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


def end_epoch(record: dict, row: dict, on_epoch) -> bool:
    """After an epoch's row is recorded: mark a run whose training loss is no longer finite as
    diverged, hand the record to ``on_epoch`` (saving as it goes), and say whether to stop."""
    if not math.isfinite(row["train_loss"]):
        record["status"] = f"diverged at epoch {row['epoch']}"
    if on_epoch is not None:
        on_epoch(record)
    return record["status"] != "ok"
