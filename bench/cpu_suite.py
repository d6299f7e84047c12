"""CPU suite: the "cpp" backend against its fair peers and the GEMM floor, in ONE run.

    .venv/bin/python -m bench.cpu_suite [--repeats N] [--name cpu-2core]

Groups (deep autoencoder 784-1000-500-250-30-250-500-1000-784, batch 1000, fp32):
  rmsprop        one multi-layer RMSProp step over all 16 weights and biases, flavour "torch"
                 with momentum: cpp (list of tensors; flat arena) vs torch.optim.RMSprop
                 (foreach=True, and foreach=False) vs the reference.
  matched_loss   every layer's matched-loss gradient: cpp vs reference eager vs
                 torch.compile(reference), and the GEMM floor (the same two mm per layer).
  outer_step     one full LocoProp-M outer step (forward, backward for dL/dZ, targets,
                 T = 10 x (all layers' matched_loss_grad + one rmsprop_step_)) with each backend,
                 and its GEMM floor (the same addmm/mm calls with nothing around them).
                 Uses ``locoprop_kernels.trainer.LocoProp`` when it exists (also timed), and a
                 plain loop over the ops always.
Times are medians of ``--repeats`` runs after a warm-up. Ratios are to each group's baseline.
Writes bench/results/<name>.json and .md with the machine (lscpu model name) and command.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import locoprop_kernels as lk
from locoprop_kernels import backends, reference
from locoprop_kernels.activations import get_activation
from bench.output import RESULTS, write_results
from locoprop_kernels.experiments import autoencoder

# tanh hidden layers, a linear 30-unit code layer, sigmoid output (its logits feed L).
SIZES = autoencoder.layer_sizes()
ACTS = autoencoder.layer_activations(len(SIZES) - 1)
BATCH = 1000
INNER_STEPS = 10


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except Exception:  # no lscpu
        model = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({model}), {gpu}"


def compare_times(entries: dict, repeats: int, warmup: int = 2, sync=None) -> dict:
    """Seconds of every call of each entry. Entries run round-robin (one call of each per
    round), so load from other processes on this shared machine hits every entry alike.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call."""
    sync = sync or (lambda: None)
    for fn in entries.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in entries}
    for _ in range(repeats):
        for name, fn in entries.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def compare(entries: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per entry (``compare_times``)."""
    return {name: statistics.median(ts)
            for name, ts in compare_times(entries, repeats, warmup).items()}


def make_layers(seed=0, sizes=SIZES):
    """Glorot-scale weights and biases of the autoencoder: [W_0, b_0, W_1, b_1, ...]."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        shapes += [(d_out, d_in), (d_out,)]
    tensors = [(torch.rand(s, generator=g) - 0.5) * 0.1 for s in shapes]
    return shapes, tensors


# ---------------------------------------------------------------------- rmsprop

def bench_rmsprop(repeats):
    shapes, tensors = make_layers()
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    kw = dict(lr=1e-5, alpha=0.9, eps=1e-5, momentum=0.999)

    def ours(backend, arena=False):
        state = [[t.clone() for t in tensors], grads, [torch.zeros_like(t) for t in tensors],
                 [torch.zeros_like(t) for t in tensors]]
        if arena:
            state = [lk.Arena.from_tensors(ts).buffer for ts in state]
        return lambda: lk.rmsprop_step_(*state, style="torch", backend=backend, **kw)

    def torch_optim(foreach):
        ps = [t.clone().requires_grad_() for t in tensors]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        return torch.optim.RMSprop(ps, foreach=foreach, **kw).step

    def backend_only():
        """The cpp backend object called directly: kernel + table, no op-layer validation."""
        be = backends.resolve("rmsprop_step_", "cpp", torch.device("cpu"))
        state = [[t.clone() for t in tensors], grads, [torch.zeros_like(t) for t in tensors],
                 [torch.zeros_like(t) for t in tensors]]
        options = lk.RMSpropOptions(style="torch", alpha=kw["alpha"], eps=kw["eps"],
                                    momentum=kw["momentum"])
        return lambda: be.rmsprop_step_(*state, [], kw["lr"], options)

    entries = {"cpp (16 tensors)": ours("cpp"), "cpp (flat arena)": ours("cpp", arena=True),
               "cpp backend, no op-layer checks (16 tensors)": backend_only(),
               "reference": ours("reference"),
               "torch.optim.RMSprop(foreach=True)": torch_optim(True),
               "torch.optim.RMSprop(foreach=False)": torch_optim(False)}
    return compare(entries, repeats), "torch.optim.RMSprop(foreach=True)"


# ---------------------------------------------------------------------- matched loss

def layer_inputs(seed=2):
    shapes, tensors = make_layers(seed)
    g = torch.Generator().manual_seed(seed + 1)
    layers = []
    for i, act in enumerate(ACTS):
        w, b = tensors[2 * i], tensors[2 * i + 1]
        x = torch.randn(BATCH, w.shape[1], generator=g)
        y = get_activation(act).f(torch.randn(BATCH, w.shape[0], generator=g))
        layers.append((x, w, b, y, act))
    return layers


def bench_matched_loss(repeats):
    layers = layer_inputs()
    outs = [(torch.empty_like(w), torch.empty_like(b)) for _, w, b, _, _ in layers]

    def ops(backend):
        def run():
            for (x, w, b, y, act), out in zip(layers, outs):
                lk.matched_loss_grad(x, w, b, y, act, backend=backend, out=out)
        return run

    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(reference.matched_loss_grad, dynamic=False)

    def run_compiled():
        for x, w, b, y, act in layers:
            compiled(x, w, b, y, act)
    z = [torch.empty(BATCH, w.shape[0]) for _, w, _, _, _ in layers]

    def floor():
        for (x, w, _, _, _), zl, (gw, _) in zip(layers, z, outs):
            torch.mm(x, w.T, out=zl)
            torch.mm(zl.T, x, out=gw)
    res = compare({"cpp": ops("cpp"), "reference (eager)": ops("reference"),
                   "torch.compile(reference)": run_compiled,
                   "GEMM floor (2 mm per layer)": floor}, repeats, warmup=3)
    return res, "reference (eager)"


# ---------------------------------------------------------------------- outer step

class OuterStep:
    """One LocoProp-M outer step as a plain loop over the ops (docs/design.md section 2):
    forward, one backward for G = dL/dZ, targets, then T x (every layer's matched_loss_grad
    into a flat gradient buffer + one rmsprop_step_ over the flat parameter buffer)."""

    def __init__(self, backend, seed=0, gamma=10.0, lr=1e-5, sizes=SIZES):
        shapes, tensors = make_layers(seed, sizes)
        self.backend, self.gamma, self.lr = backend, gamma, lr
        self.params = lk.Arena.from_tensors(tensors)
        self.grads = lk.Arena(shapes)
        self.ms = lk.Arena(shapes, fill=1.0)
        self.mom = lk.Arena(shapes, fill=0.0)
        p, gr = self.params.views(), self.grads.views()
        self.layers = [(p[2 * i], p[2 * i + 1], gr[2 * i], gr[2 * i + 1], act)
                       for i, act in enumerate(ACTS)]

    def __call__(self, x):
        inputs, preacts = [], []
        a = x
        for w, b, _, _, act in self.layers:
            inputs.append(a)
            z = torch.addmm(b, a, w.T).requires_grad_()
            preacts.append(z)
            a = get_activation(act).f(z)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            preacts[-1], x, reduction="sum") / x.shape[0]
        # dL/dZ of every layer: Z_l depends on Z_{l-1} through f and W_l (no grad for W).
        grads = torch.autograd.grad(loss, preacts)
        inputs = [t.detach() for t in inputs]
        targets = [lk.local_targets(z.detach(), g, act, self.gamma, backend=self.backend)
                   for z, g, (_, _, _, _, act) in zip(preacts, grads, self.layers)]
        for t in range(INNER_STEPS):
            for (w, b, gw, gb, act), xl, yl in zip(self.layers, inputs, targets):
                lk.matched_loss_grad(xl, w, b, yl, act, backend=self.backend, out=(gw, gb))
            lr_t = self.lr * max(1.0 - t / INNER_STEPS, 0.25)
            lk.rmsprop_step_(self.params.buffer, self.grads.buffer, self.ms.buffer,
                             self.mom.buffer, lr=lr_t, alpha=0.9, eps=1e-5, momentum=0.999,
                             style="tf", backend=self.backend)
        return loss.detach()


class GemmFloor:
    """The outer step's GEMMs alone: 8 forward addmm, 7 backward mm (G_l W_l), and
    T x 8 x 2 inner mm, into preallocated outputs (the cheapest form of the same calls)."""

    def __init__(self, sizes=SIZES, batch=BATCH):
        _, tensors = make_layers(0, sizes)
        self.w = tensors[0::2]
        self.b = tensors[1::2]
        self.z = [torch.empty(batch, w.shape[0]) for w in self.w]
        self.dx = [torch.empty(batch, w.shape[1]) for w in self.w]
        self.gw = [torch.empty_like(w) for w in self.w]
        self.x = [torch.randn(batch, w.shape[1]) for w in self.w]

    def __call__(self, x):
        a = x
        for w, b, z in zip(self.w, self.b, self.z):
            torch.addmm(b, a, w.T, out=z)
            a = z
        for w, z, dx in list(zip(self.w, self.z, self.dx))[1:]:
            torch.mm(z, w, out=dx)
        for _ in range(INNER_STEPS):
            for w, z, gw, xl in zip(self.w, self.z, self.gw, self.x):
                torch.mm(xl, w.T, out=z)
                torch.mm(z.T, xl, out=gw)


def bench_outer_step(repeats):
    x = torch.rand(BATCH, SIZES[0])
    cpp, ref, floor = OuterStep("cpp"), OuterStep("reference"), GemmFloor()
    entries = {"cpp (ops loop)": lambda: cpp(x), "reference (ops loop)": lambda: ref(x),
               "GEMM floor": lambda: floor(x)}
    try:
        trainer = importlib.import_module("locoprop_kernels.trainer")
    except ImportError:
        trainer = None
    if trainer is not None and hasattr(trainer, "LocoProp"):
        for backend in ("cpp", "reference"):
            try:
                step = _trainer_step(trainer.LocoProp, backend, x)
                step()
                entries[f"LocoProp.step ({backend})"] = step
            except Exception as error:  # the trainer is another engineer's, in progress
                print(f"LocoProp.step({backend}) not timed: {error!r}", file=sys.stderr)
    res = compare(entries, repeats, warmup=1)
    return res, "reference (ops loop)"


def _trainer_step(LocoProp, backend, x):
    torch.manual_seed(0)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(d_in, d_out))
        if ACTS[i] == "tanh":
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)

    def loss_fn(logits, target):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, reduction="sum") / target.shape[0]

    opt = LocoProp(model, loss_fn, backend=backend)
    return lambda: opt.step(x, x)


# ---------------------------------------------------------------------- report

def table(groups) -> str:
    lines = ["| group | entry | median ms | x baseline |", "|---|---|---:|---:|"]
    for group, (res, base) in groups.items():
        for name, sec in res.items():
            lines.append(f"| {group} | {name}{' (baseline)' if name == base else ''} | "
                         f"{sec * 1e3:.2f} | {sec / res[base]:.3f} |")
    return "\n".join(lines)


def targets(groups) -> dict:
    rms, _ = groups["rmsprop"]
    outer, _ = groups["outer_step"]
    speedup = rms["torch.optim.RMSprop(foreach=True)"] / rms["cpp (16 tensors)"]
    return {
        "rmsprop_cpp_speedup_vs_foreach": speedup,
        "rmsprop_target_met (>= 3x)": speedup >= 3.0,
        "outer_cpp_vs_reference": outer["cpp (ops loop)"] / outer["reference (ops loop)"],
        "outer_cpp_vs_gemm_floor": outer["cpp (ops loop)"] / outer["GEMM floor"],
        "outer_target_met (faster than reference, <= 1.15x floor)":
            outer["cpp (ops loop)"] < outer["reference (ops loop)"]
            and outer["cpp (ops loop)"] <= 1.15 * outer["GEMM floor"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--name", default="cpu-2core")
    parser.add_argument("--only", nargs="*", default=None,
                        help="groups to run (rmsprop, matched_loss, outer_step)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (the C++ kernels share its OpenMP pool)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    benches = {"rmsprop": bench_rmsprop, "matched_loss": bench_matched_loss,
               "outer_step": bench_outer_step}
    load_before = os.getloadavg()
    groups = {}
    for name, fn in benches.items():
        if args.only and name not in args.only:
            continue
        groups[name] = fn(args.repeats)
        print(f"{name}: done", file=sys.stderr)
    report = table(groups)
    print(report)
    checks = targets(groups) if len(groups) == len(benches) else {}
    for key, value in checks.items():
        print(f"{key}: {value}")
    if args.only:
        return
    command = "python -m bench.cpu_suite " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {"machine": machine(), "command": command.strip(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "batch": BATCH, "sizes": SIZES,
            "inner_steps": INNER_STEPS, "repeats": args.repeats,
            # The machine is shared: other processes' load stretches every entry of a round.
            "load_average_before_after": [load_before, os.getloadavg()],
            "cpp_build": _cpp_build_info(),
            "groups": {g: {"baseline": base, "median_s": res} for g, (res, base) in groups.items()},
            "targets": checks}
    md = [f"# CPU suite: {info['machine']}", "",
          f"Command: `{info['command']}` (torch {torch.__version__}, {info['threads']} threads, "
          f"fp32, batch {BATCH}, T = {INNER_STEPS}, medians of {args.repeats} round-robin "
          f"rounds; 1-minute load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after, on a machine shared with other jobs).", "",
          report, ""] + [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}"
                         for k, v in checks.items()]
    write_results(info, RESULTS / args.name, markdown="\n".join(md), indent=2)


def _cpp_build_info():
    if not backends.cpp_available():
        return None
    return importlib.import_module("locoprop_kernels.backends.cpp").build_info()


if __name__ == "__main__":
    main()
