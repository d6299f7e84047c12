"""lk.optim.LocoProp's step now against an earlier git revision, process against process.

    .venv/bin/python -m bench.optim_locoprop_host --rev d7b24e6 [--rounds 9] [--model mlp80]

The per-layer strategy's host cost (docs/design.md section 9, item 3 of issue 19): on many small
layers a step is mostly Python and dispatch, not arithmetic. Each round runs one process on
this tree and one on ``--rev`` (a temporary ``git worktree`` of it, with this tree's compiled
extension copied in: the C++ sources must be the same), in alternating order, each timing
``--steps`` standard-loop steps (zero_grad; backward; step(), only step() timed) after 3
warm-up steps, one thread, cpp backend, T = 10, and printing the median. The ratio is taken
per round (this machine drifts by up to 2x): its median and range are the result.
Models: ``mlp80`` (80 x Linear(4, 4) + tanh, batch 8: host-bound) or ``autoencoder`` (the
official one, batch 1000: GEMM-bound).
Writes bench/results/<name>.json and .md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.cpu_suite import machine
from bench.output import RESULTS, write_results

ROOT = Path(__file__).resolve().parent.parent

#: The timed program, run as ``python -c`` with the tree to test first on sys.path.
PROGRAM = r"""
import statistics, sys, time, torch
from torch import nn
import locoprop_kernels as lk
torch.set_num_threads(1)
model_name, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
if model_name == "mlp80":
    model = nn.Sequential(*[m for _ in range(80) for m in (nn.Linear(4, 4), nn.Tanh())])
    x = torch.randn(8, 4)
else:
    from locoprop_kernels.experiments import autoencoder
    model = autoencoder.build_model(784, seed=0)
    x = torch.rand(1000, 784, generator=torch.Generator().manual_seed(1))
opt = lk.optim.LocoProp(model, backend="cpp", inner_steps=10)
times = []
for i in range(steps + 3):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    t0 = time.perf_counter()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def time_tree(tree: Path, model: str, steps: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROGRAM, model, str(steps)], env=env,
                         cwd=tempfile.gettempdir(), check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--model", choices=("mlp80", "autoencoder"), default="mlp80")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    name = args.name or f"optim-locoprop-host-{args.model}-cpu"
    base = Path(tempfile.mkdtemp(prefix="lk-rev-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.rev], cwd=ROOT,
                   check=True)
    try:
        for so in (ROOT / "locoprop_kernels").glob("_C*.so"):
            shutil.copy(so, base / "locoprop_kernels")
        now, then, ratios = [], [], []
        for r in range(args.rounds):
            order = [("now", ROOT), ("rev", base)] if r % 2 == 0 else [("rev", base),
                                                                       ("now", ROOT)]
            got = {label: time_tree(tree, args.model, args.steps) for label, tree in order}
            now.append(got["now"])
            then.append(got["rev"])
            ratios.append(got["now"] / got["rev"])
            print(f"round {r}: now {got['now'] * 1e3:.2f} ms, {args.rev} "
                  f"{got['rev'] * 1e3:.2f} ms, ratio {ratios[-1]:.3f}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    result = dict(machine=machine(), model=args.model, rev=args.rev, rounds=args.rounds,
                  steps=args.steps, now_s=now, rev_s=then, ratios=ratios,
                  ratio_median=statistics.median(ratios),
                  command="python -m bench.optim_locoprop_host " + " ".join(
                      argv if argv is not None else sys.argv[1:]))
    lines = [f"# lk.optim.LocoProp step, this tree against {args.rev}, {result['machine']}", "",
             f"Model {args.model}, cpp backend, T = 10, one thread, {args.rounds} rounds of "
             f"one process each (alternating order), median of {args.steps} steps per "
             f"process; `{result['command']}`", "",
             "| | median ms | min-max ms |", "|---|---:|---:|",
             f"| this tree | {statistics.median(now) * 1e3:.2f} | {min(now) * 1e3:.2f}-"
             f"{max(now) * 1e3:.2f} |",
             f"| {args.rev} | {statistics.median(then) * 1e3:.2f} | {min(then) * 1e3:.2f}-"
             f"{max(then) * 1e3:.2f} |", "",
             f"per-round ratio (this tree / {args.rev}): median {result['ratio_median']:.3f} "
             f"({min(ratios):.3f}-{max(ratios):.3f})"]
    write_results(result, RESULTS / name, markdown="\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
