"""The deep-autoencoder experiment of the LocoProp paper, LocoProp against its peers.

Model (docs/design.md section 2): 784-1000-500-250-30-250-500-1000-784 (the data's width at both
ends), tanh hidden layers, a linear 30-unit code layer, logits out; Glorot-uniform init of every
W (d_out, d_in) and every b (d,) (limit sqrt(6 / (fan_in + fan_out)), fan_in = fan_out = d for
a bias). Loss: L = BCEWithLogits(logits, x, sum) / B, i.e. the BCE summed over the pixels and
averaged over the batch. Batch 1000. Each optimizer of ``optimizers.py`` (with its learning
rate sweep) starts from the same initial weights and sees the same shuffles.

Per optimizer and epoch it records the loss over the whole training set and the test set
(evaluated after the epoch, outside the timed region), the cumulative training wall time, the
learning rate and the device, writes ``bench/results/autoencoder-<device>.json`` and draws
``.png`` beside it (loss vs epoch and vs wall time). Epoch 0 is the initial model. LocoProp's
epoch 1 runs at lr = 0 (the official schedule), so our epoch numbers are those of the official
log: its 122.7 / 80.7 / 65.2 are after our epochs 2 / 3 / 5.

LocoProp presets (``optimizers.PRESETS``): ``locoprop-m`` runs ``preset="official"``, the
reproduction, unchanged. ``locoprop-m-fast`` runs ``preset="fast"``, for time to a target loss:
T = 2, 5 warm-up steps (``warmup_steps``; at lr = 0, or ``warmup="grad-square"``: square
averages set from the first batches' squared gradients) in place of the lr = 0 epoch, then
the outer lr of ``optimizers.fast_lr_factor`` (a decay on the run's budget, here its
``epochs``, or in steps). ``python -m bench.race`` (bench/race/) races them on the clock.

    locoprop-autoencoder --epochs 6 --optimizers locoprop-m,adam,rmsprop     # full MNIST
    locoprop-autoencoder --dataset digits --epochs 3                          # smoke run
    locoprop-autoencoder --epochs 6 --optimizers locoprop-m-fast,adam          # preset fast
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import data, optimizers
from .results import OFFICIAL_LOG, best_runs, end_epoch, full_mnist

HIDDEN = [1000, 500, 250, 30, 250, 500, 1000]
CODE_LAYER = 3  # index of the 30-unit layer in HIDDEN: linear (identity), not tanh
BATCH = 1000


# ----------------------------------------------------------------------------- model, loss

def layer_sizes(d: int = 784) -> list:
    """Widths of the official autoencoder for d-pixel images: d-1000-500-250-30-250-500-1000-d."""
    return [d] + HIDDEN + [d]


def layer_activations(n_layers: int) -> list:
    """f of each Linear: tanh, the code layer identity, the output layer sigmoid (its local
    loss only: the model itself returns logits)."""
    acts = ["identity" if i == CODE_LAYER else "tanh" for i in range(n_layers - 1)]
    return acts + ["sigmoid"]


def glorot_uniform_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Keras' glorot_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); (d,) -> fan d, d."""
    fan_in, fan_out = (t.shape[1], t.shape[0]) if t.dim() == 2 else (t.shape[0], t.shape[0])
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        values = torch.rand(t.shape, generator=generator, dtype=torch.float64)
        t.copy_((2.0 * values - 1.0) * limit)
    return t


def build_model(d: int, *, seed: int = 0, device="cpu", dtype=torch.float32) -> nn.Sequential:
    """The official autoencoder for d-pixel images, Glorot-initialised from ``seed``."""
    sizes = layer_sizes(d)
    g = torch.Generator().manual_seed(seed)
    acts = layer_activations(len(sizes) - 1)
    mods = []
    for d_in, d_out, act in zip(sizes, sizes[1:], acts):
        lin = nn.Linear(d_in, d_out)
        glorot_uniform_(lin.weight, g)
        glorot_uniform_(lin.bias, g)
        mods.append(lin)
        if act == "tanh":
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).to(device=device, dtype=dtype)


def bce_loss(logits: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The official loss: BCE on logits summed over pixels; "mean" averages over the batch
    (sum / B), "sum" sums, "none" gives one value per row (asdl's K-FAC asks for these)."""
    if reduction == "mean":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    per_row = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    return per_row.sum() if reduction == "sum" else per_row


@torch.no_grad()
def mean_loss(model: nn.Module, images: torch.Tensor, chunk: int = 10000) -> float:
    """L over a whole set: the per-image BCE (summed over pixels) averaged over the images."""
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk]
        total += bce_loss(model(x).float(), x.float(), "sum").double()
    return total.item() / images.shape[0]


# ----------------------------------------------------------------------------- one run

def device_name(device: torch.device) -> str:
    """A human name for the device, recorded with every number."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core CPU ({platform.machine()})"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")
    return "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(name: str, lr: Optional[float], split: data.Split, *, epochs: int, seed: int,
            device: torch.device, dtype: torch.dtype, batch: int, backend: Optional[str],
            progress: bool, on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train one optimizer for ``epochs`` epochs; its record (losses per epoch, times).
    ``on_epoch(record)`` is called after every epoch (e.g. to save a long run as it goes)."""
    from tqdm.auto import tqdm

    d = split.train.shape[1]
    model = build_model(d, seed=seed, device=device, dtype=dtype)
    train = split.train.to(device=device, dtype=dtype)
    test = split.test.to(device=device, dtype=dtype)
    method = optimizers.build(name, lr, model, bce_loss, batch=batch, total_epochs=100,
                              activations=layer_activations(len(HIDDEN) + 1), backend=backend)
    record = dict(name=name, lr=lr, label=method.label, status="ok", epochs=[])
    record["epochs"].append(dict(epoch=0, train_loss=mean_loss(model, train),
                                 test_loss=mean_loss(model, test), wall_s=0.0, lr=None,
                                 batch_loss=None))
    wall = 0.0
    n = train.shape[0]
    # the run's budget in steps: a schedule on the budget (the fast preset's decay) reads
    # steps done / this before every step
    total_steps, steps_done = epochs * math.ceil(n / batch), 0
    bar = tqdm(range(1, epochs + 1), desc=method.label, unit="epoch", disable=not progress,
               leave=True, file=sys.stderr)
    for epoch in bar:
        method.start_epoch(epoch - 1)  # the schedule counts from 0 (LocoProp: 0 = lr 0)
        lr_now = getattr(getattr(method, "opt", None), "lr", lr)
        # the same shuffle for every optimizer: a generator seeded per epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        batch_sum = torch.zeros((), dtype=torch.float64, device=device)
        _sync(device)
        start = time.perf_counter()
        for i in tqdm(range(0, n, batch), desc=f"epoch {epoch}", unit="batch", leave=False,
                      disable=not progress, file=sys.stderr):
            x = train[order[i:i + batch].to(device)]
            method.set_progress(steps_done / total_steps)
            batch_sum += method.step(x).double() * x.shape[0]
            steps_done += 1
        _sync(device)
        wall += time.perf_counter() - start
        row = dict(epoch=epoch, train_loss=mean_loss(model, train),
                   test_loss=mean_loss(model, test), wall_s=wall, lr=lr_now,
                   batch_loss=batch_sum.item() / n)
        record["epochs"].append(row)
        bar.set_postfix(train=f"{row['train_loss']:.1f}", test=f"{row['test_loss']:.1f}")
        if not progress:  # a log line per epoch instead of the bars (nohup runs, CI)
            print(f"{method.label} epoch {epoch}: train {row['train_loss']:.2f} test "
                  f"{row['test_loss']:.2f} ({wall:.0f} s)", file=sys.stderr, flush=True)
        if end_epoch(record, row, on_epoch):
            break
    bar.close()
    return record


# ----------------------------------------------------------------------------- reporting

def report_epochs(epochs: int) -> list:
    """Epochs shown in the table: all of them for short runs, else the official log's."""
    if epochs <= 6:
        return list(range(1, epochs + 1))
    return [e for e in (1, 2, 3, 5, 10, 14, 25, 50, 100) if e <= epochs]


def table(result: dict) -> str:
    """A markdown table: train loss after the report epochs, final test loss, s/epoch."""
    runs = result["runs"]
    last = max((len(r["epochs"]) - 1 for r in runs), default=0)
    shown = report_epochs(last)
    best = {id(r) for r in best_runs(runs).values()}
    head = ("| optimizer | " + " | ".join(f"ep {e}" for e in shown)
            + " | test (last) | s/epoch |")
    lines = [f"Train loss (BCE summed over pixels, mean over images) on {result['dataset']} "
             f"({result['train_size']} train / {result['test_size']} test), "
             f"{result['device']}; * = best lr of its optimizer", "", head,
             "|" + "---|" * (len(shown) + 3)]
    if full_mnist(result):
        log = dict(zip(OFFICIAL_LOG["epochs"], OFFICIAL_LOG["train_loss"]))
        lines.append("| official LocoProp-M log (TF1) | "
                     + " | ".join(f"{log[e]:.1f}" if e in log else "" for e in shown)
                     + " | | |")
    for r in runs:
        by_epoch = {row["epoch"]: row for row in r["epochs"]}
        cells = [f"{by_epoch[e]['train_loss']:.1f}" if e in by_epoch else "" for e in shown]
        done = r["epochs"][-1] if len(r["epochs"]) > 1 else None
        test = f"{done['test_loss']:.1f}" if done else ""
        per_epoch = f"{done['wall_s'] / done['epoch']:.1f}" if done else ""
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        mark = " *" if id(r) in best else ""
        lines.append(f"| {r['label']}{mark}{status} | " + " | ".join(cells)
                     + f" | {test} | {per_epoch} |")
    return "\n".join(lines)


def merge_runs(old: dict, new_runs: list) -> list:
    """Earlier runs of the same data set and device, replaced by label where re-run."""
    labels = {r["label"] for r in new_runs}
    return [r for r in old.get("runs", []) if r["label"] not in labels] + new_runs


# ----------------------------------------------------------------------------- CLI

def parse_lrs(text: Optional[str]) -> dict:
    """'adam=1e-3:3e-3,rmsprop=1e-4' -> {'adam': [1e-3, 3e-3], 'rmsprop': [1e-4]}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, values = item.partition("=")
        out[name.strip()] = [float(v) for v in values.split(":")]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="locoprop-autoencoder", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=data.NAMES, default="mnist")
    p.add_argument("--epochs", type=int, default=6,
                   help="training epochs (LocoProp's first one is the lr = 0 epoch)")
    p.add_argument("--optimizers", default="locoprop-m,rmsprop,adam",
                   help=f"comma-separated, from {','.join(optimizers.NAMES)}, or 'all'")
    p.add_argument("--lrs", default=None,
                   help="override sweeps, e.g. 'adam=1e-3:3e-3,rmsprop=1e-4'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--train-subset", type=int, default=None, help="first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="first N test images")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="our ops' backend (default: auto)")
    p.add_argument("--output", default=None,
                   help="JSON path (default bench/results/autoencoder-<device>.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in the output file (re-run labels replaced)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    names = list(optimizers.NAMES) if args.optimizers == "all" else [
        n.strip() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in optimizers.SWEEPS:
            raise SystemExit(f"unknown optimizer {n!r}: choose from {list(optimizers.NAMES)}")
    sweeps = {**optimizers.SWEEPS, **parse_lrs(args.lrs)}
    try:
        split = data.load(args.dataset)
    except data.DataUnavailable as error:
        raise SystemExit(f"locoprop-autoencoder: data set {args.dataset!r} unavailable: {error}")
    if args.train_subset:
        split = data.Split(split.train[:args.train_subset], split.test)
    if args.test_subset:
        split = data.Split(split.train, split.test[:args.test_subset])
    output = Path(args.output or Path("bench/results") / f"autoencoder-{device_slug(device)}.json")
    result = dict(experiment="deep autoencoder (LocoProp paper)", dataset=args.dataset,
                  train_size=split.train.shape[0], test_size=split.test.shape[0],
                  device=device_name(device), dtype=args.dtype, batch=args.batch,
                  seed=args.seed, torch=torch.__version__, official_log=OFFICIAL_LOG,
                  runs=[])
    for name in names:
        missing = optimizers.available(name)
        if missing is not None:
            print(f"skipping {name}: not installed ({missing})", file=sys.stderr)
            continue
        for lr in sweeps[name]:
            try:
                done = list(result["runs"])
                record = run_one(name, lr, split, epochs=args.epochs, seed=args.seed,
                                 device=device, dtype=dtype, batch=args.batch,
                                 backend=args.backend, progress=not args.no_progress,
                                 on_epoch=lambda rec: _write(output, {**result,
                                                                      "runs": done + [rec]},
                                                             args.merge))
            except Exception as error:  # noqa: BLE001 - one failing peer must not end the run
                label = name if lr is None else f"{name} lr={lr:g}"
                print(f"{label} failed: {type(error).__name__}: {error}", file=sys.stderr)
                record = dict(name=name, lr=lr, label=label, epochs=[],
                              status=f"failed: {type(error).__name__}: {str(error)[:200]}")
            result["runs"].append(record)
            _write(output, result, args.merge)  # after every run: a long run keeps its parts
    result = _write(output, result, args.merge)
    print(table(result))
    print(f"\nwrote {output} and {output.with_suffix('.png')}")
    return result


def _write(output: Path, result: dict, merge: bool) -> dict:
    from .plot import plot

    if merge and output.exists():
        old = json.loads(output.read_text())
        if (old.get("dataset"), old.get("device")) == (result["dataset"], result["device"]):
            result = {**result, "runs": merge_runs(old, result["runs"])}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, output.with_suffix(".png"))
    return result


def cli() -> int:
    """The ``locoprop-autoencoder`` console script: run, then exit with status 0. (Its wrapper
    does ``sys.exit(cli())``; pointing it at ``main``, which returns the result dict, printed
    that dict to stderr and exited with status 1 after every successful run.)"""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
