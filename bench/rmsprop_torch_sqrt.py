"""What torch's square root costs the cpp RMSProp step: interleaved in ONE process.

    .venv/bin/python bench/rmsprop_torch_sqrt.py [--rounds 60] [--centered] [--threads N]

Entries, each stepped once per round, round-robin (this machine's drift hits them alike), on
ResNet-18's parameter shapes (11.7M fp32 values, grads set, lr 1e-9 so nothing drifts):
  lk torch sqrt   lk.optim.RMSprop(backend="cpp"): bit for bit torch.optim.RMSprop, with
                  torch's own sqrt (MKL VML, a block at a time; backends/cpp.py torch_sqrt)
  lk IEEE sqrt    the same with the IEEE sqrt (LOCOPROP_IEEE_SQRT=1): one pass
  torch foreach   torch.optim.RMSprop(foreach=True)
Prints medians, the spread and the per-round ratios to "lk IEEE sqrt" (median, quartiles).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import locoprop_kernels as lk
from locoprop_kernels.backends import cpp


def resnet18_shapes() -> list:
    """torchvision's resnet18() parameter shapes: a 7x7 stem, 4 stages of 2 basic blocks
    (3x3 convs, widths 64..512, a 1x1 projection where the width changes), a 1000-way head."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for width in (64, 128, 256, 512):
        for b in range(2):
            shapes += [(width, c_in, 3, 3), (width,), (width,), (width, width, 3, 3), (width,),
                       (width,)]
            if b == 0 and c_in != width:
                shapes += [(width, c_in, 1, 1), (width,), (width,)]
            c_in = width
    return shapes + [(1000, 512), (1000,)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--centered", action="store_true",
                        help="centered, momentum 0.9, weight_decay 0.1 (else torch's defaults)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(lr=1e-9)
    if args.centered:
        kw.update(centered=True, momentum=0.9, weight_decay=0.1)
    shapes = resnet18_shapes()
    gen = torch.Generator().manual_seed(0)

    def params():
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        return ps

    real = cpp.torch_sqrt
    entries = {"lk torch sqrt": (real, lk.optim.RMSprop(params(), backend="cpp", **kw)),
               "lk IEEE sqrt": (lambda: (0, 0, "ieee"),
                                lk.optim.RMSprop(params(), backend="cpp", **kw)),
               "torch foreach": (real, torch.optim.RMSprop(params(), foreach=True, **kw))}
    times = {k: [] for k in entries}
    try:
        for r in range(args.rounds + 3):
            for name, (sqrt, opt) in entries.items():
                cpp.torch_sqrt = sqrt
                t0 = time.perf_counter()
                opt.step()
                if r >= 3:  # warm-up rounds
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        cpp.torch_sqrt = real
    print(f"{sum(torch.Size(s).numel() for s in shapes)} fp32 values, "
          f"{torch.get_num_threads()} threads, {kw}, torch's sqrt: {real()[2]}")
    base = times["lk IEEE sqrt"]
    for name, ts in times.items():
        ratio = [a / b for a, b in zip(ts, base)]
        q1, _, q3 = statistics.quantiles(ratio, n=4)
        print(f"{name:14s} median {statistics.median(ts):7.2f} ms [{min(ts):.2f}-{max(ts):.2f}]"
              f"   / lk IEEE sqrt: median {statistics.median(ratio):.2f} (IQR {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    main()
