"""One run, one device: per-op kernels and full LocoProp outer steps beside their peers.

    python -m bench.gpu_suite --out $OUT            # on the lent GPU (CUDA events, medians)
    python -m bench.gpu_suite --smoke               # tiny shapes, any device (CI smoke)

Measures, on the autoencoder's layers (784-1000-500-250-30-250-500-1000-784):
- per op: matched_loss_grad (tanh, softmax) and RMSProp over all 16 tensors: triton vs PyTorch
  eager (the reference) vs torch.compile of the reference vs torch.optim.RMSprop(foreach=True);
- one LocoProp-M outer step (T = 10) for batch 1000 and 4096, fp32 and bf16 params:
  reference eager, torch.compile of the reference inner loop, our per-layer ops, our grouped
  path, grouped + CUDA graph; an Adam backprop step on the same model (yardstick); and the
  GEMM floor: the same GEMMs alone through cuBLAS (forward 8, backward 7 for dL/dZ, and
  T x (8 + 8) for the inner loop: X W^T and D^T X per layer).
Prints a table of median times and ratios, writes JSON (and the table as markdown) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import locoprop_kernels as lk  # noqa: E402
from bench.output import write_results  # noqa: E402
from locoprop_kernels import reference  # noqa: E402
from locoprop_kernels.experiments import autoencoder  # noqa: E402
from locoprop_kernels.triton_kernels import config_table  # noqa: E402

# The official autoencoder: tanh hidden layers, a linear 30-unit code layer, sigmoid output.
SIZES = autoencoder.layer_sizes()
ACTS = autoencoder.layer_activations(len(SIZES) - 1)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def median_ms(fn, device: str, *, reps: int, warmup: int) -> float:
    """Median wall time of fn() in ms: CUDA events around each call on the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_model(sizes, device, dtype, seed=0):
    torch.manual_seed(seed)
    layers = []
    modules = {"tanh": torch.nn.Tanh, "identity": torch.nn.Identity, "sigmoid": torch.nn.Identity}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(modules[ACTS[i]]())
    return torch.nn.Sequential(*layers).to(device, dtype)


def bce_loss(logits, target):
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), target.float(), reduction="sum") / logits.shape[0]


# ----------------------------------------------------------------------------- outer steps

def reference_inner_loop(ws, bs, ms, mom, xs, ys, lrs, acts, *, T, scale=1.0):
    """The inner loop in plain PyTorch from reference.py (TF RMSProp; lrs a device tensor)."""
    for t in range(T):
        for i, act in enumerate(acts):
            gw, gb = reference.matched_loss_grad(xs[i], ws[i].float(), bs[i].float(), ys[i],
                                                 act, scale=scale)
            for p, g, s, m in ((ws[i], gw, ms[2 * i], mom[2 * i]),
                               (bs[i], gb, ms[2 * i + 1], mom[2 * i + 1])):
                s.mul_(0.9).addcmul_(g, g, value=0.1)
                m.mul_(0.999).add_(lrs[t] * g / torch.sqrt(s + 1e-5))
                p.sub_(m.to(p.dtype))


class ReferenceStep:
    """Forward, dL/dZ, targets and the inner loop, all plain PyTorch (optionally compiled
    inner loop: torch.compile of the reference, lr as a tensor so new lrs never recompile)."""

    def __init__(self, model, T, compile_inner: bool):
        self.model, self.T = model, T
        self.linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        self.ms = [torch.ones_like(p, dtype=torch.float32) for p in model.parameters()]
        self.mom = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
        dev = self.linears[0].weight.device
        self.lrs = torch.tensor([1e-5 * max(1 - t / T, 0.25) for t in range(T)], device=dev)
        self.inner = torch.compile(reference_inner_loop) \
            if compile_inner else reference_inner_loop

    def step(self, x, y):
        xs, zs = [], []
        h = x
        for i, lin in enumerate(self.linears):
            xs.append(h.float().detach())
            z = lin(h)
            zs.append(z)
            h = torch.tanh(z) if ACTS[i] == "tanh" else z
        loss = bce_loss(zs[-1], y)
        grads = torch.autograd.grad(loss, zs)
        with torch.no_grad():
            ys = [reference.local_targets(z.float(), g.float(), act, 10.0)
                  for z, g, act in zip(zs, grads, ACTS)]
            self.inner([l.weight for l in self.linears], [l.bias for l in self.linears],
                       self.ms, self.mom, xs, ys, self.lrs, tuple(ACTS), T=self.T)
        return loss.detach()


def gemm_floor(model, x, T):
    """The outer step's GEMMs alone (cuBLAS through addmm/mm), same shapes, nothing around."""
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    B = x.shape[0]
    hs = [torch.randn(B, l.in_features, device=x.device, dtype=x.dtype) for l in linears]
    ds = [torch.randn(B, l.out_features, device=x.device, dtype=x.dtype) for l in linears]
    outs = [torch.empty(B, l.out_features, device=x.device, dtype=x.dtype) for l in linears]
    dxs = [torch.empty_like(h) for h in hs]
    gws = [torch.empty_like(l.weight) for l in linears]

    @torch.no_grad()
    def run():
        for l, h, o in zip(linears, hs, outs):              # forward: Z = X W^T + b
            torch.addmm(l.bias, h, l.weight.T, out=o)
        for l, d, dx in zip(linears[1:], ds[1:], dxs[1:]):   # backward: dL/dX = dL/dZ W
            torch.mm(d, l.weight, out=dx)
        for _ in range(T):                                    # inner loop: Z and D^T X
            for l, h, d, o, gw in zip(linears, hs, ds, outs, gws):
                torch.addmm(l.bias, h, l.weight.T, out=o)
                torch.mm(d.T, h, out=gw)
    return run


def outer_step_rows(device, dtype, batch, T, reps, warmup, smoke):
    sizes = [max(2, s // 50) for s in SIZES] if smoke else SIZES
    x = torch.rand(batch, sizes[0], device=device, dtype=dtype)
    rows = {}
    candidates = {
        "reference eager": lambda m: ReferenceStep(m, T, compile_inner=False).step,
        "compile(reference inner loop)": lambda m: ReferenceStep(m, T, compile_inner=True).step,
        "ours per-layer ops": lambda m: lk.LocoProp(m, bce_loss, inner_steps=T, grouped=False).step,
        "ours grouped": lambda m: lk.LocoProp(m, bce_loss, inner_steps=T, grouped=True).step,
        "ours grouped + CUDA graph": lambda m: lk.LocoProp(m, bce_loss, inner_steps=T,
                                                           grouped=True, cuda_graph=True).step,
    }
    if device != "cuda":
        candidates.pop("ours grouped + CUDA graph")
    for name, make in candidates.items():
        model = build_model(sizes, device, dtype)
        try:
            step = make(model)
            rows[name] = median_ms(lambda: step(x, x), device, reps=reps, warmup=warmup)
        except Exception as error:  # noqa: BLE001 - a failing entry is reported, not fatal
            rows[name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    model = build_model(sizes, device, dtype)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)

    def adam_step():
        adam.zero_grad(set_to_none=True)
        bce_loss(model(x), x).backward()
        adam.step()
    rows["Adam backprop step"] = median_ms(adam_step, device, reps=reps, warmup=warmup)
    rows["GEMM floor"] = median_ms(gemm_floor(build_model(sizes, device, dtype), x, T), device,
                                   reps=reps, warmup=warmup)
    return rows


# ----------------------------------------------------------------------------- per-op rows

def op_rows(device, reps, warmup, smoke):
    B, d = (20, 20) if smoke else (1000, 1000)
    rows = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g).to(device)
    w = (torch.randn(d, d, generator=g) / d ** 0.5).to(device)
    b = torch.randn(d, generator=g).to(device)
    compiled = torch.compile(reference.matched_loss_grad, dynamic=False)
    for act in ("tanh", "softmax"):
        y = lk.ACTIVATIONS[act].f(torch.randn(B, d, generator=g)).to(device)
        key = f"matched_loss_grad[{act}] B={B} {d}x{d}"
        rows[key] = {
            "eager": median_ms(lambda: reference.matched_loss_grad(x, w, b, y, act), device,
                               reps=reps, warmup=warmup),
            "compile": median_ms(lambda: compiled(x, w, b, y, act), device, reps=reps,
                                 warmup=warmup),
            "triton": median_ms(lambda: lk.matched_loss_grad(x, w, b, y, act, backend="triton"),
                                device, reps=reps, warmup=warmup),
        }
    sizes = [max(2, s // 50) for s in SIZES] if smoke else SIZES
    shapes = [s for a, c in zip(sizes, sizes[1:]) for s in ((c, a), (c,))]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    for p, gr in zip(params, grads):
        p.grad = gr
    opt = torch.optim.RMSprop(params, lr=1e-4, alpha=0.9, eps=1e-5, momentum=0.9, foreach=True)
    arena = [lk.Arena.from_tensors(params).buffer, lk.Arena.from_tensors(grads).buffer,
             lk.Arena(shapes, device=device).buffer, lk.Arena(shapes, device=device).buffer]
    ms = [torch.zeros_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    kw = dict(lr=1e-4, alpha=0.9, eps=1e-5, momentum=0.9, style="torch")
    n = sum(p.numel() for p in params)
    rows[f"rmsprop 16 tensors ({n} params)"] = {
        "eager": median_ms(lambda: reference.rmsprop_step_(params, grads, ms, bufs, **kw), device,
                           reps=reps, warmup=warmup),
        "torch.optim foreach": median_ms(opt.step, device, reps=reps, warmup=warmup),
        "triton arena": median_ms(lambda: lk.rmsprop_step_(*arena, backend="triton", **kw),
                                  device, reps=reps, warmup=warmup),
        "copy (same bytes)": median_ms(lambda: arena[3].copy_(arena[2]), device, reps=reps,
                                       warmup=warmup),
    }
    return rows


def render(results) -> str:
    lines = [f"# GPU suite on {results['device']}", "", f"command: `{results['command']}`", ""]
    lines += ["## Per op (median ms; ratio = time / eager)", "", "| op | who | ms | ratio |",
              "|---|---|---:|---:|"]
    for op, entries in results["ops"].items():
        base = entries.get("eager")
        for who, ms in entries.items():
            lines.append(f"| {op} | {who} | {ms:.3f} | {ms / base:.2f}x |")
    lines += ["", "## LocoProp-M outer step, T = 10 (median ms; ratio = time / reference eager;"
              " over floor = time / GEMM floor)", "",
              "| batch | dtype | who | ms | vs eager | over floor |", "|---|---|---|---:|---:|---:|"]
    for key, entries in results["outer"].items():
        base, floor = entries.get("reference eager"), entries.get("GEMM floor")
        for who, ms in entries.items():
            if isinstance(ms, str):
                lines.append(f"| {key} | {who} | {ms} | | |")
                continue
            ratio = f"{ms / base:.2f}x" if isinstance(base, float) else ""
            over = f"{ms / floor:.2f}x" if isinstance(floor, float) else ""
            lines.append(f"| {key} | {who} | {ms:.3f} | {ratio} | {over} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="folder for JSON and markdown")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep (CI)")
    parser.add_argument("--batches", default="1000,4096")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reps, warmup = (1, 1) if args.smoke else (args.reps, 3)
    batches = [8] if args.smoke else [int(b) for b in args.batches.split(",")]
    dtypes = ["float32"] if args.smoke else args.dtypes.split(",")
    results = {"device": device_name(device), "torch": torch.__version__,
               "triton_configs": config_table.NOTE,
               "command": " ".join(["python", *sys.argv]), "T": 10, "smoke": args.smoke,
               "ops": op_rows(device, reps, warmup, args.smoke), "outer": {}}
    for batch in batches:
        for dtype in dtypes:
            key = f"{batch} {dtype}"
            results["outer"][key] = outer_step_rows(device, getattr(torch, dtype), batch, 10,
                                                    reps, warmup, args.smoke)
            print(key, json.dumps(results["outer"][key]), flush=True)
    table = render(results)
    print(table)
    tag = "smoke" if args.smoke else results["device"].replace(" ", "-").lower()
    write_results(results, Path(args.out) / f"gpu-suite-{tag}", markdown=table, indent=2)
    return results


if __name__ == "__main__":
    main()
