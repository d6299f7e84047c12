"""lk.LocoProp.step now against the same trainer at an earlier git revision, in one process.

    .venv/bin/python -m bench.trainer_vs_revision --rev 0a5a651 [--repeats 15] [--backend cpp]
        [--threads N]   (with OMP_NUM_THREADS=N for the cpp backend's OpenMP loops)

This machine's speed drifts by up to 2x within a run, so two processes timed one after the other
compare nothing: here both trainers run in ONE process, one outer step of each per round,
round-robin. The earlier ``trainer.py`` and ``inner_loop.py`` are taken from ``git show REV:...``
into temporary modules inside the package (removed on exit); they run on today's ops, so the
difference measured is the trainer's own (e.g. the t = 0 skip of 1354f36: the first inner
iteration needs no GEMM). Also checks that both give the same weights (float64, reference
backend, 3 steps) before timing. The official autoencoder, batch 1000, fp32, T = 10.
Writes bench/results/<name>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.cpu_suite import compare_times, machine
from bench.output import RESULTS, write_results

import locoprop_kernels as lk  # noqa: E402
from locoprop_kernels.experiments import autoencoder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "locoprop_kernels"


def load_revision_trainer(rev: str):
    """The LocoProp class of ``rev``'s trainer.py (with its own inner_loop.py)."""
    files = {}
    for name in ("trainer", "inner_loop"):
        text = subprocess.run(["git", "show", f"{rev}:locoprop_kernels/{name}.py"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout
        files[name] = text.replace("from .inner_loop import", "from ._rev_inner_loop import")
    paths = []
    try:
        for name, text in files.items():
            path = PKG / f"_rev_{name}.py"
            path.write_text(text)
            paths.append(path)
        return importlib.import_module("locoprop_kernels._rev_trainer").LocoProp
    finally:
        for path in paths:
            path.unlink()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--name", default="trainer-vs-revision-cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Old = load_revision_trainer(args.rev)
    loss_fn = autoencoder.bce_loss

    # Same weights: float64, reference backend, 3 steps.
    base = autoencoder.build_model(784, seed=0).double()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    old64 = Old(a, loss_fn, output_activation="sigmoid", backend="reference", lr=1e-4)
    new64 = lk.LocoProp(b, loss_fn, output_activation="sigmoid", backend="reference", lr=1e-4)
    x64 = torch.rand(64, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        old64.step(x64, x64)
        new64.step(x64, x64)
    rel = ((new64.params.buffer - old64.params.buffer).norm()
           / old64.params.buffer.norm()).item()
    print(f"float64, 3 steps: ||new - old|| / ||old|| = {rel:.2e}", flush=True)

    model = autoencoder.build_model(784, seed=0)
    m_old, m_new = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(output_activation="sigmoid", backend=args.backend, inner_steps=args.inner_steps)
    old = Old(m_old, loss_fn, **kw)
    new = lk.LocoProp(m_new, loss_fn, **kw)
    x = torch.rand(args.batch, 784, generator=torch.Generator().manual_seed(1))
    entries = {f"lk.LocoProp.step @ {args.rev}": lambda: old.step(x, x),
               "lk.LocoProp.step (this tree)": lambda: new.step(x, x)}
    times = compare_times(entries, args.repeats, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    old_key, new_key = entries
    ratios = [n / o for o, n in zip(times[old_key], times[new_key])]
    result = dict(machine=machine(), torch=torch.__version__, threads=torch.get_num_threads(),
                  rev=args.rev, backend=args.backend, batch=args.batch,
                  inner_steps=args.inner_steps, rel_err_fp64=rel, times=times, median=med,
                  ratio_of_medians=med[new_key] / med[old_key],
                  per_round_ratio_median=statistics.median(ratios),
                  per_round_ratio_range=[min(ratios), max(ratios)],
                  command="python -m bench.trainer_vs_revision " + " ".join(
                      argv if argv is not None else sys.argv[1:]))
    lines = [f"# lk.LocoProp.step: this tree vs {args.rev}, {result['machine']}", "",
             f"Autoencoder, batch {args.batch}, T = {args.inner_steps}, fp32, backend "
             f"{args.backend}, {args.repeats} interleaved rounds in one process; "
             f"`{result['command'].strip()}`", "",
             f"Same weights first: float64 reference, 3 steps, relative difference {rel:.1e}.",
             "", "| entry | median s | min-max s |", "|---|---:|---:|"]
    lines += [f"| {k} | {med[k]:.3f} | {min(v):.3f}-{max(v):.3f} |" for k, v in times.items()]
    lines += ["", f"new / old: ratio of medians {result['ratio_of_medians']:.3f}; per round "
              f"median {result['per_round_ratio_median']:.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})", ""]
    write_results(result, RESULTS / args.name, markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
