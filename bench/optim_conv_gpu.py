"""The Fashion-MNIST CNN's step on a GPU: matched conv losses vs linearized ones vs Adam.

    python -m bench.optim_conv_gpu [--repeats 20] [--batch 100]   (bench/device_run.sh runs it)

The CNN of ``experiments/classification.py`` (Conv2d(1,16,5)+ReLU+MaxPool2,
Conv2d(16,32,5)+ReLU+MaxPool2, Linear head; cross-entropy, output_activation "softmax"),
28x28 inputs (random pixels and labels: the step's cost does not depend on the data), fp32 on
CUDA. Entries, one standard-loop step each (zero_grad; loss.backward(); step()):

  matched/<backend>     lk.optim.LocoProp, convs and head with matched losses (T = 10)
  linearized/<backend>  the same with both convs excluded (their local loss linearized)
  adam                  torch.optim.Adam (the yardstick)

1. Correctness: 3 steps of matched/<backend> against the same in float64 on the CPU
   (reference backend): ||W - W_ref|| / ||W_ref|| over all parameters.
2. Time: round-robin, one step of each entry per round, synchronised; median and min-max ms.
Writes bench/results/optim-conv-<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from bench.cpu_suite import compare_times, machine
from bench.optim_rmsprop_gpu import _cuda_backends
from bench.output import RESULTS, write_results

from locoprop_kernels.experiments import classification  # noqa: E402

LR = {"matched": 3e-5, "linearized": 1e-6, "adam": 1e-2}  # the CPU sweep's best (docs)


class Entry:
    def __init__(self, name, base, device, dtype, backend=None):
        self.model = copy.deepcopy(base).to(device=device, dtype=dtype)
        kind = name.split("/")[0]
        opt_name = {"matched": "locoprop-m", "linearized": "locoprop-m-linconv",
                    "adam": "adam"}[kind]
        self.opt = classification.build_optimizer(opt_name, LR[kind], self.model,
                                                  backend=backend)

    def step(self, x, y):
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.opt.step()

    def weights(self):
        return torch.cat([p.detach().double().cpu().reshape(-1)
                          for p in self.model.parameters()])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check this script on the CPU (cpp backend)")
    args = parser.parse_args(argv)
    dev = "cpu" if args.dry_run_cpu else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("optim_conv_gpu.py needs a CUDA GPU (or --dry-run-cpu)")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    base = classification.build_model("cnn", 784, seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(args.batch, 784, generator=g),
                torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(3)]
    names = []
    for be in (_cuda_backends() if dev == "cuda" else ["cpp"]):
        names += [f"matched/{be}", f"linearized/{be}"]
    names.append("adam")

    ref = Entry("matched/reference", base, "cpu", torch.float64, "reference")
    for x, y in batches:
        ref.step(x.double(), y)
    want = ref.weights()

    errors, entries = {}, {}
    for name in names:
        try:
            be = name.split("/")[1] if "/" in name else None
            e = Entry(name, base, dev, torch.float32, be)
            for x, y in batches:
                e.step(x.to(dev), y.to(dev))
            sync()
            if name.startswith("matched/"):
                errors[name] = ((e.weights() - want).norm() / want.norm()).item()
            entries[name] = e
        except Exception as error:  # noqa: BLE001 - report every entry, keep going
            errors[name] = f"{type(error).__name__}: {error}"
        print(f"{name}: {errors.get(name, 'ok')}", flush=True)

    x, y = batches[0][0].to(dev), batches[0][1].to(dev)
    seconds = compare_times({name: (lambda e=e: e.step(x, y)) for name, e in entries.items()},
                            args.repeats, warmup=2, sync=sync)
    times = {name: [t * 1e3 for t in ts] for name, ts in seconds.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    gpu_name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    result = dict(machine=machine(), torch=torch.__version__, batch=args.batch, inner_steps=10,
                  repeats=args.repeats, lrs=LR, rel_err=errors, times_ms=times, median_ms=med)
    lines = [f"# Fashion-MNIST CNN step on {gpu_name}: matched vs linearized conv losses", "",
             f"Batch {args.batch}, 28x28, T = 10, fp32 (ieee), one standard-loop step; "
             f"{args.repeats} round-robin rounds; `python -m bench.optim_conv_gpu`", "",
             "| entry | rel err vs fp64 CPU (3 steps) | median ms | min-max ms |",
             "|---|---:|---:|---:|"]
    for name in names:
        err = errors.get(name)
        err_s = (f"{err:.2e}" if isinstance(err, float)
                 else ("-" if err is None else f"FAILED: {err[:80]}"))
        if name in times:
            v = times[name]
            lines.append(f"| {name} | {err_s} | {med[name]:.2f} | {min(v):.2f}-{max(v):.2f} |")
        else:
            lines.append(f"| {name} | {err_s} | - | - |")
    for be in (_cuda_backends() if dev == "cuda" else ["cpp"]):
        if f"matched/{be}" in med and f"linearized/{be}" in med:
            lines.append(f"\n{be}: matched / linearized = "
                         f"{med[f'matched/{be}'] / med[f'linearized/{be}']:.2f}x")
    print("\n".join(lines))
    if args.dry_run_cpu:
        return
    gpu = gpu_name.replace(" ", "-").lower()
    write_results(result, RESULTS / f"optim-conv-{gpu}", markdown="\n".join(lines))


if __name__ == "__main__":
    main()
