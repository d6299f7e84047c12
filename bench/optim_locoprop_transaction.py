"""What the whole-step guarantee costs: lk.optim.LocoProp.step() on the official autoencoder
(784-1000-500-250-30-250-500-1000-784, batch 1000, T = 10, cpp) with the transaction's copies
of parameters and state (the default) against the same step without them, interleaved in one
process. Prints per-round ratios, their median and spread.

    python bench/optim_locoprop_transaction.py --rounds 15
"""
import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import locoprop_kernels as lk
from locoprop_kernels.optim import locoprop as lp


class _NoBackup:
    def __init__(self, params, state):
        pass

    def restore(self, state):
        pass


def autoencoder():
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 and i != 3:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1000, 784)
    models = {k: autoencoder() for k in ("with", "without")}
    opts = {k: lk.optim.LocoProp(m, lr=1e-5, output_activation="sigmoid", backend="cpp")
            for k, m in models.items()}
    real = lp._Backup

    def step(kind):
        m, opt = models[kind], opts[kind]
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(m(x), x, reduction="sum").div(1000).backward()
        lp._Backup = real if kind == "with" else _NoBackup
        t = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t
        lp._Backup = real
        return dt

    for kind in models:  # warm-up
        step(kind)
    ratios = []
    for r in range(args.rounds):
        order = ("with", "without") if r % 2 == 0 else ("without", "with")
        t = {k: step(k) for k in order}
        ratios.append(t["with"] / t["without"])
        print(f"round {r}: with {t['with'] * 1e3:.1f} ms, without {t['without'] * 1e3:.1f} ms, "
              f"ratio {ratios[-1]:.3f}")
    # The copies alone, against the step they protect (less sensitive to the drift).
    opt = opts["with"]
    params = [p for g in opt.param_groups for p in g["params"]]
    copies = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        real(params, opt.state)
        copies.append(time.perf_counter() - t)
    print(f"the copies alone: median {statistics.median(copies) * 1e3:.1f} ms "
          f"(min {min(copies) * 1e3:.1f}, max {max(copies) * 1e3:.1f})")
    q = statistics.quantiles(ratios, n=4)
    print(f"median ratio {statistics.median(ratios):.3f} (quartiles {q[0]:.3f} .. {q[2]:.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds, "
          f"{args.threads} thread)")


if __name__ == "__main__":
    main()
