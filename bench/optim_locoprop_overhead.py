"""The standard-loop API against the Sequential trainer, per outer step, side by side.

    .venv/bin/python -m bench.optim_locoprop_overhead [--repeats 7] [--backend cpp]

The official deep autoencoder (784-1000-500-250-30-250-500-1000-784, tanh, linear code layer,
sigmoid output loss), batch 1000, T = 10, fp32, the official settings. Entries, one call each
per round, round-robin (this machine drifts):
  lk.LocoProp.step(x, x)                 the Sequential trainer (one forward, dL/dZ only)
  lk.optim.LocoProp, standard loop       zero_grad; loss(model(x), x).backward(); step()
Writes bench/results/<name>.json and .md with medians, min-max and the ratio.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from bench.cpu_suite import compare_times, machine
from bench.output import RESULTS, write_results

import locoprop_kernels as lk  # noqa: E402
from locoprop_kernels.experiments import autoencoder  # noqa: E402



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--name", default="optim-locoprop-overhead-cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = autoencoder.build_model(784, seed=0)
    twin = copy.deepcopy(model)
    loss_fn = autoencoder.bce_loss
    trainer = lk.LocoProp(model, loss_fn, output_activation="sigmoid", backend=args.backend)
    opt = lk.optim.LocoProp(twin, output_activation="sigmoid", backend=args.backend)
    x = torch.rand(args.batch, 784, generator=torch.Generator().manual_seed(1))

    def standard_loop():
        opt.zero_grad()
        loss_fn(twin(x), x).backward()
        opt.step()

    entries = {"lk.LocoProp.step": lambda: trainer.step(x, x),
               "lk.optim.LocoProp standard loop": standard_loop}
    times = compare_times(entries, args.repeats, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["lk.optim.LocoProp standard loop"] / med["lk.LocoProp.step"]
    result = dict(machine=machine(), torch=torch.__version__, threads=torch.get_num_threads(),
                  backend=args.backend, batch=args.batch, inner_steps=10, times=times,
                  median=med, ratio=ratio,
                  command="python -m bench.optim_locoprop_overhead " + " ".join(
                      argv if argv is not None else sys.argv[1:]))
    lines = [f"# Standard-loop LocoProp vs the Sequential trainer, {result['machine']}", "",
             f"Autoencoder, batch {args.batch}, T = 10, fp32, backend {args.backend}, "
             f"{args.repeats} interleaved rounds; `{result['command'].strip()}`", "",
             "| entry | median s | min-max s |", "|---|---:|---:|"]
    lines += [f"| {k} | {med[k]:.3f} | {min(v):.3f}-{max(v):.3f} |" for k, v in times.items()]
    lines += ["", f"standard loop / Sequential trainer: {ratio:.3f}x", ""]
    write_results(result, RESULTS / args.name, markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
