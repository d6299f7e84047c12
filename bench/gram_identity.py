"""The Gram-matrix inner loop against the un-saved floor (issue: LocoProp on the clock).

    .venv/bin/python bench/gram_identity.py [--rounds 15] [--backend cpp] [--threads N]

Three ``nn.Linear(256, 256)`` without activations (quadratic local losses), 4096 rows, T = 10,
float32, the official RMSProp settings. Timed per round, round-robin (this machine drifts), one
call each:
  floor        the un-saved GEMM floor: T - 1 inner iterations x 3 layers x the two
               (4096 x 256 x 256) GEMMs of the matched-loss gradient (Z = X W^T, D^T X), nothing
               else: what the op path cannot go under
  per-layer gram=never  ``opt.step()`` of ``lk.optim.LocoProp`` (``grouped=False``) with the
                       matched-loss op every iteration
  per-layer gram=auto   the same with the Gram form (X^T X once per step, chosen by the rule)
  grouped gram=never    ``grouped=True``: the grouped strategy (flat arenas, one InnerLoop over
                       a LayerGroup; on cpp its matched layers run one op each), matched op
  grouped gram=auto     the grouped strategy with the Gram form (GramTerms in the group)
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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's); 1 is steadier on a "
                             "shared machine, where a descheduled GEMM thread stalls the rest")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x = torch.randn(ROWS, WIDTH)
    y = torch.randn(ROWS, WIDTH)
    base = model()
    opts = {}
    for strategy in ("per-layer", "grouped"):
        for gram in ("never", "auto"):
            m = copy.deepcopy(base)
            opts[f"{strategy} gram={gram}"] = (m, lk.optim.LocoProp(
                m, lr=1e-4, inner_steps=T, gram=gram, backend=args.backend,
                output_activation="identity", grouped=strategy == "grouped"))
    weights = [torch.randn(WIDTH, WIDTH) for _ in range(LAYERS)]
    z, gw = torch.empty(ROWS, WIDTH), torch.empty(WIDTH, WIDTH)

    def floor():
        for _ in range(T - 1):
            for w in weights:
                torch.mm(x, w.t(), out=z)
                torch.mm(z.t(), x, out=gw)

    def step(entry):
        m, opt = opts[entry]
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    def timed_floor():
        start = time.perf_counter()
        floor()
        return time.perf_counter() - start

    entries = {"floor": timed_floor}
    entries.update({name: (lambda name=name: step(name)) for name in opts})
    for fn in entries.values():  # warm-up (MKL, the extension, the state)
        fn()
    times = {k: [] for k in entries}
    for _ in range(args.rounds):
        for name, fn in entries.items():
            times[name].append(fn())
    for name, (_, opt) in opts.items():
        inner = [i.inner for i in opt.layers]
        assert inner == ["gram" if "auto" in name else "matched"] * LAYERS, (name, inner)
        assert opt.strategy.startswith(name.split()[0]), (name, opt.strategy)
    ratios = {k: [a / b for a, b in zip(times[k], times["floor"])] for k in opts}
    # The grouped step against the per-layer one of the same gram option, round by round.
    grouped_ratios = {g: [a / b for a, b in zip(times[f"grouped gram={g}"],
                                                times[f"per-layer gram={g}"])]
                      for g in ("never", "auto")}
    # The Gram form's step against the matched op's, per strategy, round by round.
    gram_ratios = {st: [a / b for a, b in zip(times[f"{st} gram=auto"],
                                              times[f"{st} gram=never"])]
                   for st in ("per-layer", "grouped")}
    result = dict(
        machine=f"{platform.machine()} {platform.processor() or ''} "
                f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        shape=dict(rows=ROWS, width=WIDTH, layers=LAYERS, inner_steps=T),
        backend=args.backend, rounds=args.rounds,
        median_ms={k: 1e3 * statistics.median(v) for k, v in times.items()},
        min_max_ms={k: [1e3 * min(v), 1e3 * max(v)] for k, v in times.items()},
        ratio_to_floor={k: dict(median=statistics.median(v), min=min(v), max=max(v))
                        for k, v in ratios.items()},
        grouped_to_per_layer={f"gram={k}": dict(median=statistics.median(v), min=min(v),
                                                max=max(v)) for k, v in grouped_ratios.items()},
        auto_to_never={k: dict(median=statistics.median(v), min=min(v), max=max(v))
                       for k, v in gram_ratios.items()},
        layers_inner={k: [i.inner for i in opt.layers] for k, (_, opt) in opts.items()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Gram-matrix inner loop vs the un-saved floor ({result['machine']})", "",
             f"3 x Linear({WIDTH}, {WIDTH}) without activations, {ROWS} rows, T = {T}, "
             f"float32, backend {args.backend}, {args.rounds} interleaved rounds. "
             f"`python bench/gram_identity.py --rounds {args.rounds}"
             f"{'' if args.threads is None else f' --threads {args.threads}'}`", "",
             "| entry | median ms | min-max ms | step / floor: median (min-max) |",
             "|---|---|---|---|"]
    for k in entries:
        r = ratio_to = result["ratio_to_floor"].get(k)
        ratio_to = "1" if r is None else f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        lo, hi = result["min_max_ms"][k]
        lines.append(f"| {k} | {result['median_ms'][k]:.1f} | {lo:.1f}-{hi:.1f} | {ratio_to} |")
    lines += ["", "Grouped step / per-layer step of the same gram option, per round: " + "; ".join(
        f"{k}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        for k, r in result["grouped_to_per_layer"].items())]
    lines += ["", "gram=auto step / gram=never step of the same strategy, per round: " + "; ".join(
        f"{k}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        for k, r in result["auto_to_never"].items())]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
