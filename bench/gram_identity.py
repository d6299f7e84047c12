"""The Gram-matrix inner loop against the un-saved floor (issue: LocoProp on the clock).

    .venv/bin/python bench/gram_identity.py [--rounds 15] [--backend cpp]

Three ``nn.Linear(256, 256)`` without activations (quadratic local losses), 4096 rows, T = 10,
float32, the official RMSProp settings. Timed per round, round-robin (this machine drifts), one
call each:
  floor        the un-saved GEMM floor: T - 1 inner iterations x 3 layers x the two
               (4096 x 256 x 256) GEMMs of the matched-loss gradient (Z = X W^T, D^T X), nothing
               else: what the op path cannot go under
  gram=never   ``opt.step()`` of ``lk.optim.LocoProp`` with the matched-loss op every iteration
  gram=auto    ``opt.step()`` with the Gram form (X^T X once per step, chosen by the rule)
The forward/backward that records X, Z0 and p.grad runs before each step, untimed.
Writes bench/results/<name>.json and .md: medians, min-max, and each round's step / floor.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import locoprop_kernels as lk

RESULTS = Path(__file__).resolve().parent / "results"
ROWS, WIDTH, LAYERS, T = 4096, 256, 3, 10


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--name", default="gram-identity-cpu")
    args = parser.parse_args(argv)
    x = torch.randn(ROWS, WIDTH)
    y = torch.randn(ROWS, WIDTH)
    base = model()
    opts = {}
    for gram in ("never", "auto"):
        m = copy.deepcopy(base)
        opts[gram] = (m, lk.optim.LocoProp(m, lr=1e-4, inner_steps=T, gram=gram,
                                           backend=args.backend,
                                           output_activation="identity"))
    weights = [torch.randn(WIDTH, WIDTH) for _ in range(LAYERS)]
    z, gw = torch.empty(ROWS, WIDTH), torch.empty(WIDTH, WIDTH)

    def floor():
        for _ in range(T - 1):
            for w in weights:
                torch.mm(x, w.t(), out=z)
                torch.mm(z.t(), x, out=gw)

    def step(gram):
        m, opt = opts[gram]
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    def timed_floor():
        start = time.perf_counter()
        floor()
        return time.perf_counter() - start

    entries = {"floor": timed_floor, "gram=never": lambda: step("never"),
               "gram=auto": lambda: step("auto")}
    for fn in entries.values():  # warm-up (MKL, the extension, the state)
        fn()
    times = {k: [] for k in entries}
    for _ in range(args.rounds):
        for name, fn in entries.items():
            times[name].append(fn())
    inner = [i.inner for i in opts["auto"][1].layers]
    assert inner == ["gram"] * LAYERS, inner
    ratios = {k: [a / b for a, b in zip(times[k], times["floor"])]
              for k in ("gram=never", "gram=auto")}
    result = dict(
        machine=f"{platform.machine()} {platform.processor() or ''} "
                f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        shape=dict(rows=ROWS, width=WIDTH, layers=LAYERS, inner_steps=T),
        backend=args.backend, rounds=args.rounds,
        median_ms={k: 1e3 * statistics.median(v) for k, v in times.items()},
        min_max_ms={k: [1e3 * min(v), 1e3 * max(v)] for k, v in times.items()},
        ratio_to_floor={k: dict(median=statistics.median(v), min=min(v), max=max(v))
                        for k, v in ratios.items()},
        layers_inner=inner)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Gram-matrix inner loop vs the un-saved floor ({result['machine']})", "",
             f"3 x Linear({WIDTH}, {WIDTH}) without activations, {ROWS} rows, T = {T}, "
             f"float32, backend {args.backend}, {args.rounds} interleaved rounds. "
             f"`python bench/gram_identity.py --rounds {args.rounds}`", "",
             "| entry | median ms | min-max ms | step / floor: median (min-max) |",
             "|---|---|---|---|"]
    for k in entries:
        r = ratio_to = result["ratio_to_floor"].get(k)
        ratio_to = "1" if r is None else f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        lo, hi = result["min_max_ms"][k]
        lines.append(f"| {k} | {result['median_ms'][k]:.1f} | {lo:.1f}-{hi:.1f} | {ratio_to} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
