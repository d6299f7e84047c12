"""Per-op results on a GPU: the triton backend's matched_loss_grad routes vs eager torch at the
same precision.

    python bench/matched_loss_grad_device.py --out $OUT     # on the lent GPU
    python bench/matched_loss_grad_device.py --dry-run      # CPU, interpreter, tiny shapes

For tanh, softmax, relu at (B, d_in, d_out) = (1000, 1000, 1000) and (8192, 768, 3072), and
precision "ieee" (fp32 tensors, TF32 off), "tf32" (fp32 tensors, TF32 on for torch's matmul
and ours), "bf16" (bf16 tensors; ours: bf16 operands, fp32 accumulation, epilogue in fp32):
  fused  TritonBackend.matched_loss_grad_into on the "fused" route (stage 1 + stage 2 Triton
         kernels, the configs of triton_kernels/config_table.py)
  gemm   the same on the "gemm" route (torch.mm at the precision + our delta and finish passes)
  auto   the same as users get it: the route the backend chose for this key by timing both on
         the first call (backends/_routes.py; that call is the warm-up, not timed here); the
         chooser's own medians are reported next to ours. Element-wise activations share a
         key, so relu takes the route tanh's first call chose (and shows tanh's medians)
  eager  Z = X W^T + b; D = f(Z) - Y; grad_W = D^T X; grad_b = sum_n D  (torch, same dtype)
timed interleaved (one call of each per round, CUDA events), medians and spread (max - min
over the rounds) in ms, and the ratios to eager. Each route's result is also checked against
float64 (normwise relative error, the bounds of tests/test_triton_precision.py) on fresh
random inputs, outputs poisoned with NaN before the run.
Prints a markdown table last; writes JSON and the table under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from locoprop_kernels import backends, reference  # noqa: E402
from locoprop_kernels.activations import ACTIVATIONS  # noqa: E402
from locoprop_kernels.backends.triton import TritonBackend, _matmul_precision  # noqa: E402

SHAPES = [(1000, 1000, 1000), (8192, 768, 3072)]
DRY_SHAPES = [(33, 40, 24)]
ACTS = ["tanh", "softmax", "relu"]
PRECISIONS = ["ieee", "tf32", "bf16"]
#: The backend's routes timed side by side; "auto" is the one it chose.
ROUTES = ["fused", "gemm", "auto"]
#: tests/test_triton_precision.py's bounds (normwise relative error vs float64).
BOUND = {"ieee": 1e-5, "tf32": 4e-3, "bf16": 1e-2}


def eager(x, w, b, y, f):
    d = f(x @ w.T + b) - y
    return d.T @ x, d.sum(0)


def rel_err(got, want) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


class Timer:
    """One call in ms: CUDA events on the GPU, the host clock on the CPU (dry run)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def one_config(shape, act: str, precision: str, device: str, reps: int, seed: int) -> dict:
    B, K, N = shape
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, K, device=device, generator=g)
    w = torch.randn(N, K, device=device, generator=g) / K ** 0.5
    b = torch.randn(N, device=device, generator=g)
    y = ACTIVATIONS[act].f(torch.randn(B, N, device=device, generator=g))
    x, w, b, y = (t.to(dtype) for t in (x, w, b, y))
    f = ACTIVATIONS[act].f
    gw = torch.full_like(w, float("nan"))
    gb = torch.full_like(b, float("nan"))
    backend = TritonBackend()

    def route_call(route):
        def call():
            with backends.using_route(route):
                backend.matched_loss_grad_into(x, w, b, y, act, 1.0, None, None, None, gw, gb,
                                               precision)
        return call

    calls = {route: route_call(route) for route in ROUTES}
    calls["eager"] = lambda: eager(x, w, b, y, f)
    row = dict(shape=list(shape), activation=act, precision=precision, dtype=str(dtype),
               bound=BOUND[precision])
    # Eager torch at the same precision as the triton routes' GEMMs (the backend's own switch).
    with _matmul_precision(precision, x.device):
        for call in calls.values():
            call()  # warm-up: JIT compiles; "auto" decides this key (times both routes)
        key = backends.RouteKey.of(x, w, "softmax" if act == "softmax" else "elementwise",
                                   precision, False)
        (decision,) = [d for d in backends.routes() if d.key == key]
        row.update(route=decision.route, route_how=decision.how,
                   chooser_fused_ms=decision.fused_ms, chooser_gemm_ms=decision.gemm_ms)
        # float64 on the same device (the GPU's fp64 units: seconds, not minutes, at 8192 rows)
        rw, rb = reference.matched_loss_grad(x.double(), w.double(), b.double(), y.double(),
                                             act)
        for route in ("fused", "gemm"):
            gw.fill_(float("nan"))
            gb.fill_(float("nan"))
            calls[route]()
            row[f"err_{route}"] = max(rel_err(gw, rw), rel_err(gb, rb))
        row["eager_err"] = max(rel_err(t, r) for t, r in zip(calls["eager"](), (rw, rb)))
        timer = Timer(device)
        times = {name: [] for name in calls}
        for _ in range(reps):  # interleaved: one call of each per round
            for name, call in calls.items():
                times[name].append(timer(call))
    errs = [row["err_fused"], row["err_gemm"]]
    row["err"] = max(errs)
    row["within_bound"] = all(e <= BOUND[precision] and e == e for e in errs)
    for name, ts in times.items():
        row[f"{name}_ms"] = statistics.median(ts)
        row[f"{name}_spread_ms"] = max(ts) - min(ts)
    for route in ROUTES:
        row[f"{route}_ratio"] = row[f"{route}_ms"] / row["eager_ms"]
    return row


def render(rows, device_name: str) -> str:
    lines = [f"matched_loss_grad on {device_name}: the triton backend's routes vs eager torch, "
             f"same precision; medians over interleaved rounds (spread = max - min), ms; auto = "
             f"the route the backend chose (its chooser's medians fused / gemm)", "",
             "| shape (B, d_in, d_out) | f | precision | fused ms (spread) | gemm ms (spread) "
             "| auto ms: route (chooser fused / gemm) | eager ms (spread) "
             "| fused / gemm / auto vs eager | err fused / gemm vs fp64 (bound) | eager err |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(v):
        return "-" if v is None else f"{v:.3f}"
    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['activation']} | {r['precision']} | "
            f"{r['fused_ms']:.3f} ({r['fused_spread_ms']:.3f}) | "
            f"{r['gemm_ms']:.3f} ({r['gemm_spread_ms']:.3f}) | "
            f"{r['auto_ms']:.3f}: {r['route']} ({ms(r['chooser_fused_ms'])} / "
            f"{ms(r['chooser_gemm_ms'])}) | "
            f"{r['eager_ms']:.3f} ({r['eager_spread_ms']:.3f}) | "
            f"{r['fused_ratio']:.2f} / {r['gemm_ratio']:.2f} / {r['auto_ratio']:.2f} | "
            f"{r['err_fused']:.1e} / {r['err_gemm']:.1e} ({r['bound']:.0e})"
            f"{'' if r['within_bound'] else ' OVER'} | {r['eager_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, 2 rounds, on the CPU under the interpreter")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("matched_loss_grad_device: on the CPU it needs TRITON_INTERPRET=1")
    shapes, reps = (DRY_SHAPES, 2) if args.dry_run else (SHAPES, args.reps)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    rows = [one_config(s, a, p, device, reps, seed=i)
            for i, (s, a, p) in enumerate((s, a, p) for s in shapes for a in ACTS
                                          for p in PRECISIONS)]
    table = render(rows, name)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "matched-loss-grad-device.json").write_text(
            json.dumps(dict(device=name, rows=rows), indent=1))
        (out / "matched-loss-grad-device.md").write_text(table)
    print(table)
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
