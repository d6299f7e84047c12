"""Both LocoProp APIs on a GPU: correct against float64 on the CPU, and the time of one step.

    python -m bench.optim_locoprop_gpu [--repeats 20]      (bench/device_run.sh runs it)

The official deep autoencoder (784-1000-500-250-30-250-500-1000-784, tanh, sigmoid output
loss), batch 1000, T = 10, fp32 on CUDA, the official settings. Entries:

  seq/<backend>[/graph]   lk.LocoProp.step(x, x), the Sequential trainer (its default path on
                          that backend: grouped for triton, + the CUDA-graph inner loop)
  std/<backend>[/graph]   lk.optim.LocoProp in the standard loop:
                          zero_grad; loss(model(x), x).backward(); step()
                          (lk.LocoProp is a thin layer over it: both take the same strategy)

1. Correctness: 3 outer steps of each entry from the same weights and batches, against the same
   API in float64 on the CPU (reference backend); ||W - W_ref|| / ||W_ref|| over all weights
   (fp32 kernels: ~1e-6 expected; tf32 would be ~1e-3; the default precision is "ieee").
2. Time: round-robin, one outer step of each entry per round, synchronised; median and min-max
   milliseconds over ``--repeats`` rounds, after 2 warm-up steps (Triton compiles, graph
   capture).
Writes bench/results/optim-locoprop-<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from bench.cpu_suite import compare_times, machine
from bench.optim_rmsprop_gpu import _cuda_backends
from bench.output import RESULTS, write_results

import locoprop_kernels as lk  # noqa: E402
from locoprop_kernels.experiments import autoencoder  # noqa: E402



class Entry:
    """One API on one backend, with its own model copy; ``step(x)`` is one outer step."""

    def __init__(self, api: str, base: torch.nn.Module, device, dtype, backend,
                 cuda_graph=False):
        self.model = copy.deepcopy(base).to(device=device, dtype=dtype)
        self.api = api
        if api == "seq":
            self.opt = lk.LocoProp(self.model, autoencoder.bce_loss, output_activation="sigmoid",
                                   backend=backend, cuda_graph=cuda_graph)
        else:
            self.opt = lk.optim.LocoProp(self.model, output_activation="sigmoid",
                                         backend=backend, cuda_graph=cuda_graph)

    def step(self, x):
        if self.api == "seq":
            self.opt.step(x, x)
        else:
            self.opt.zero_grad()
            autoencoder.bce_loss(self.model(x), x).backward()
            self.opt.step()

    def weights(self):
        return torch.cat([p.detach().double().cpu().reshape(-1)
                          for p in self.model.parameters()])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check this script on the CPU (cpp backend, 2 rounds)")
    args = parser.parse_args(argv)
    dev = "cpu" if args.dry_run_cpu else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("optim_locoprop_gpu.py needs a CUDA GPU (or --dry-run-cpu)")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    base = autoencoder.build_model(784, seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(args.batch, 784, generator=g) for _ in range(3)]

    specs = []
    for be in (_cuda_backends() if dev == "cuda" else ["cpp"]):
        specs.append((f"seq/{be}", "seq", be, False))
        if be == "triton":
            specs.append((f"seq/{be}/graph", "seq", be, True))
        specs.append((f"std/{be}", "std", be, False))
        if be == "triton":
            specs.append((f"std/{be}/graph", "std", be, True))

    refs = {}
    for api in ("seq", "std"):
        ref = Entry(api, base, "cpu", torch.float64, "reference")
        for x in batches:
            ref.step(x.double())
        refs[api] = ref.weights()

    errors, entries = {}, {}
    for name, api, be, graph in specs:
        try:
            e = Entry(api, base, dev, torch.float32, be, cuda_graph=graph)
            for x in batches:
                e.step(x.to(dev))
            sync()
            w = e.weights()
            errors[name] = ((w - refs[api]).norm() / refs[api].norm()).item()
            entries[name] = e
        except Exception as error:  # noqa: BLE001 - report every entry, keep going
            errors[name] = f"{type(error).__name__}: {error}"
        print(f"{name}: rel err after 3 steps vs fp64 CPU = {errors[name]}", flush=True)

    x = batches[0].to(dev)
    seconds = compare_times({name: (lambda e=e: e.step(x)) for name, e in entries.items()},
                            args.repeats, warmup=2, sync=sync)
    times = {name: [t * 1e3 for t in ts] for name, ts in seconds.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    def graph_state(opt):
        optimizer = getattr(opt, "optimizer", opt)  # lk.LocoProp wraps its lk.optim.LocoProp
        loops = list(getattr(optimizer, "_grouped_cache", {}).values())
        return f"{optimizer.strategy}: {loops[0].graph_state}" if loops else optimizer.strategy

    graph_states = {name: graph_state(e.opt) for name, e in entries.items()}
    result = dict(machine=machine(), torch=torch.__version__, batch=args.batch,
                  inner_steps=10, repeats=args.repeats, rel_err=errors, times_ms=times,
                  median_ms=med, graph_states=graph_states)
    gpu_name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    lines = [f"# Both LocoProp APIs on {gpu_name}", "",
             f"Autoencoder, batch {args.batch}, T = 10, fp32 (ieee), one outer step; "
             f"{args.repeats} round-robin rounds; `python -m bench.optim_locoprop_gpu`", "",
             "| entry | rel err vs fp64 CPU (3 steps) | median ms | min-max ms |",
             "|---|---:|---:|---:|"]
    for name, err in errors.items():
        err_s = f"{err:.2e}" if isinstance(err, float) else f"FAILED: {err[:80]}"
        if name in times:
            v = times[name]
            lines.append(f"| {name} | {err_s} | {med[name]:.2f} | {min(v):.2f}-{max(v):.2f} |")
        else:
            lines.append(f"| {name} | {err_s} | - | - |")
    lines += ["", f"graph states: {graph_states}", ""]
    if args.dry_run_cpu:
        print("\n".join(lines))
        return
    gpu = gpu_name.replace(" ", "-").lower()
    write_results(result, RESULTS / f"optim-locoprop-{gpu}", markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
