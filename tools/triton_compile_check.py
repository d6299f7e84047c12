"""Compile every Triton kernel variant our launchers produce for a real GPU, without a GPU.

    python tools/triton_compile_check.py [--arch 90] [--out FILE]      (make triton-check)

The tests run the kernels under Triton's interpreter, which executes them as numpy and never
compiles them: a kernel that the GPU compiler rejects (a dot with a tile edge under 16, a type
mix the interpreter tolerates, a constexpr misuse) would pass CI and break on the first GPU.
This script drives the real launchers (``triton_kernels/*.py``) over the cases the package
uses -- every activation, dtype (and mixed precision: half x and target, fp32 parameters),
bias/prox setting, dot precision, both tile regimes, the
grouped kernels on the autoencoder's layer table, RMSProp flat and table forms with lr as a
value and as a device pointer and with torch's options (centered, maximize, weight decay) --
but replaces the launch with ``triton.compile`` for the target
(sm_90 by default) on the signature the launch would have had. It fails on any compile error
and checks the dot precision in the generated PTX: ``precision="ieee"`` must not use the
tensor cores (IEEE fp32 FMAs), ``"tf32"`` must. Where Triton ships ``cuobjdump`` it also
reports registers and stack (spills) per variant: no GPU time needed for that either.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

# The interpreter would make the launchers' kernels numpy functions: compile needs the real JIT.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (it replaces the compiler)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from locoprop_kernels.activations import ACTIVATIONS  # noqa: E402
from locoprop_kernels.experiments import autoencoder  # noqa: E402
from locoprop_kernels.grouped import LayerGroup, LayerSpec  # noqa: E402
from locoprop_kernels.rmsprop_options import RMSpropOptions  # noqa: E402
from locoprop_kernels.triton_kernels import (  # noqa: E402
    activation, grouped_matched_loss_grad as grouped, local_targets, matched_loss_grad, rmsprop)

# Tensor dtype -> Triton pointer type; Python scalars as Triton's launcher types them.
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
           torch.int64: "*i64"}
DOT_KERNELS = ("_delta_kernel", "_weight_grad_kernel", "_grouped_delta_kernel",
               "_grouped_weight_grad_kernel")
# The deep autoencoder's layers (DESIGN section 2): the grouped kernels' real table.
AUTOENCODER = autoencoder.layer_sizes()
AUTOENCODER_ACTS = autoencoder.layer_activations(len(AUTOENCODER) - 1)


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


class Compiler:
    """Stands in for ``_launch.launch``: compiles each distinct (kernel, signature, constexprs)
    once for ``target`` and records what came out."""

    def __init__(self, target: GPUTarget, options: dict):
        self.target, self.options = target, options
        self.seen = {}
        self.rows = []
        self.failures = []
        self.context = ""
        nvidia_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        cuobjdump = os.path.join(nvidia_bin, "cuobjdump")
        self.cuobjdump = cuobjdump if os.path.exists(cuobjdump) else None

    def __call__(self, kernel, grid, *args, **constexprs):
        options = dict(self.options)
        if "num_warps" in constexprs:  # a launch option, not a kernel argument
            options.setdefault("num_warps", constexprs.pop("num_warps"))
        if "enable_fp_fusion" in constexprs:  # likewise (the RMSProp kernels turn it off)
            options["enable_fp_fusion"] = constexprs.pop("enable_fp_fusion")
        names = kernel.arg_names
        runtime = [n for n in names if n not in constexprs]
        signature = {n: arg_type(v) for n, v in zip(runtime, args)}
        signature.update({n: "constexpr" for n in constexprs})
        signature = {n: signature[n] for n in names}
        key = (kernel.__name__, tuple(signature.items()),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())), options["num_warps"])
        if key in self.seen:
            return
        label = f"{kernel.__name__} {self.context} " + " ".join(
            f"{k}={v}" for k, v in constexprs.items()
            if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK")) + \
            f" tiles={[constexprs[k] for k in ('BLOCK_M', 'BLOCK_N', 'BLOCK_K') if k in constexprs]}"
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                      target=self.target, options=options)
        except Exception as err:  # noqa: BLE001 - every compiler error is a finding
            self.failures.append(f"{label}: {type(err).__name__}: {str(err)[:1500]}")
            self.seen[key] = None
            print(f"FAIL {label}", flush=True)
            return
        seconds = time.perf_counter() - t0
        ptx = compiled.asm.get("ptx", "")
        problem = (self._check_precision(kernel.__name__, constexprs, ptx)
                   or self._check_fma(kernel.__name__, constexprs, ptx))
        if problem:
            self.failures.append(f"{label}: {problem}")
        regs, stack = self._resources(compiled.asm.get("cubin"))
        self.seen[key] = compiled
        self.rows.append((label, seconds, regs, stack))
        print(f"{'FAIL' if problem else 'ok  '} {label}  {seconds:.1f}s regs={regs} "
              f"stack={stack}", flush=True)

    @staticmethod
    def _check_precision(name: str, constexprs: dict, ptx: str) -> str:
        if name not in DOT_KERNELS:
            return ""
        tensor_cores = "wgmma" in ptx or "mma.sync" in ptx
        if constexprs["PRECISION"] == "ieee" and tensor_cores:
            return "precision='ieee' compiled to tensor-core (tf32) instructions"
        if constexprs["PRECISION"] == "tf32" and not tensor_cores:
            return "precision='tf32' compiled without tensor-core instructions"
        return ""

    @staticmethod
    def _check_fma(name: str, constexprs: dict, ptx: str) -> str:
        """RMSProp kernels: exactly the multiply-adds the source writes as tl.fma (the rounding
        of torch's CPU kernels, triton_kernels/rmsprop.py), none fused by the compiler. Per
        element (one sqrt.rn each): "torch" weight decay, ms, the param with momentum; both
        styles: the centered lerp (two: both branches of a select) and ms - ga^2."""
        if not name.startswith("_rmsprop"):
            return ""
        per_element = 3 * bool(constexprs["CENTERED"])
        if not constexprs["STYLE_TF"]:
            per_element += 1 + bool(constexprs["HAS_WD"]) + bool(constexprs["HAS_MOM"])
        elements = len(re.findall(r"\bsqrt\.rn\.f32\b", ptx))
        fmas = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
        if elements == 0 or fmas != per_element * elements:
            return (f"{fmas} fma.rn.f32 for {elements} sqrt.rn.f32: expected {per_element} "
                    f"per element (a multiply-add the source does not write?)")
        return ""

    def _resources(self, cubin) -> tuple:
        if self.cuobjdump is None or not cubin:
            return "?", "?"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            report = subprocess.run([self.cuobjdump, "--dump-resource-usage", f.name],
                                    capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", report)
        return (int(m.group(1)), int(m.group(2))) if m else ("?", "?")


def table_codes_match(compiler: Compiler) -> None:
    """Every activation of the table has its code under its name in triton_kernels/activation.py
    (an unknown code would compile, and silently run as identity)."""
    for act in ACTIVATIONS.values():
        code = getattr(activation, act.name.upper(), None)
        if getattr(code, "value", None) != act.code:
            compiler.failures.append(f"activation table: {act.name} has code {act.code}, "
                                     f"triton_kernels/activation.py has {code!r}")


def per_layer_cases(compiler: Compiler) -> None:
    """matched_loss_grad (2 kernels) and local_targets through their launchers."""
    # (B, d_in, d_out): 64-wide tiles (the GPU regime) and the 16-wide minimum (tiny layers).
    shapes = {"64": (128, 96, 80), "16": (5, 3, 7)}
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for (tiles, (B, K, N)), dtype, act, has_bias, has_prox, precision in itertools.product(
            shapes.items(), dtypes, ACTIVATIONS.values(), [True, False], [False, True],
            ["ieee", "tf32"]):
        # The full product in fp32 at 64-wide tiles; half dtypes on the default precision,
        # small tiles in fp32 only (the same code with other types or sizes: compile time).
        if (dtype != torch.float32 or tiles == "16") and precision != "ieee":
            continue
        if tiles == "16" and dtype != torch.float32:
            continue
        x = torch.empty(B, K, dtype=dtype)
        w, b = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype) if has_bias else None
        y = torch.empty(B, N, dtype=dtype)
        compiler.context = f"{dtype} {act.name}"
        matched_loss_grad.matched_loss_grad_into(
            x, w, b, y, act.code, 1.0, w if has_prox else None,
            b if has_prox and has_bias else None, 0.5 if has_prox else None,
            torch.empty_like(w), torch.empty_like(b) if has_bias else None, precision=precision)
        for variant in ("M", "S"):
            local_targets.local_targets_into(y, y, act.code, 10.0, variant, torch.empty_like(y))
    # Mixed precision (half x and target, fp32 weight, bias, anchors and outputs: what
    # torch.autocast records): the same kernels specialised on mixed pointer types, at the
    # GPU tiles and the default precision.
    B, K, N = shapes["64"]
    for low, act, has_bias, has_prox in itertools.product(
            [torch.bfloat16, torch.float16], ACTIVATIONS.values(), [True, False], [False, True]):
        x, y = torch.empty(B, K, dtype=low), torch.empty(B, N, dtype=low)
        w, b = torch.empty(N, K), torch.empty(N) if has_bias else None
        compiler.context = f"{low} operands, fp32 params {act.name}"
        matched_loss_grad.matched_loss_grad_into(
            x, w, b, y, act.code, 1.0, w if has_prox else None,
            b if has_prox and has_bias else None, 0.5 if has_prox else None,
            torch.empty_like(w), torch.empty_like(b) if has_bias else None, precision="ieee")


def grouped_cases(compiler: Compiler) -> None:
    """The grouped kernels on the autoencoder's 8 layers (and a ragged table with softmax and
    leaky_relu; the code is run-time data there, so every activation is in each variant)."""
    tables = {"autoencoder": (AUTOENCODER, AUTOENCODER_ACTS),
              "ragged": ([7, 1, 33, 5, 9], ["softmax", "relu", "sigmoid", "leaky_relu"])}
    for (name, (sizes, acts)), dtype, has_prox, precision in itertools.product(
            tables.items(), [torch.float32, torch.bfloat16], [False, True], ["ieee", "tf32"]):
        if dtype != torch.float32 and precision != "ieee":
            continue
        batch = 1000 if name == "autoencoder" else 3
        # The trainer's layout (LayerGroup's arenas and layer rows), planned as the triton
        # backend plans it; the reference backend only stands in for building the group.
        group = LayerGroup([LayerSpec(d_in, d_out, act) for d_in, d_out, act
                            in zip(sizes, sizes[1:], acts)], batch, device="cpu", dtype=dtype,
                           backend="reference")
        plan = grouped.plan(batch, group.layer_table(), "cpu", dtype=dtype, precision=precision)
        params = torch.empty(group.num_params, dtype=dtype)
        compiler.context = f"{dtype} {name}"
        grouped.grouped_matched_loss_grad_(
            plan, group.inputs.buffer, params, group.targets.buffer,
            torch.empty(group.targets.buffer.shape), torch.empty(group.num_params),
            anchors=params if has_prox else None, eta=0.5 if has_prox else None)


# torch's options beyond the base product of rmsprop_cases: a few combinations, not all 2^3.
RMSPROP_EXTRA = [
    dict(style="torch", centered=True, momentum=0.9),
    dict(style="torch", centered=True, maximize=True, weight_decay=0.1, momentum=0.9),
    dict(style="tf", centered=True),
    dict(style="tf", maximize=True, weight_decay=0.1, momentum=0.9),
]


def rmsprop_cases(compiler: Compiler) -> None:
    """RMSProp: flat arena and table forms, both styles, momentum on/off, lr value/pointer;
    then the options of RMSPROP_EXTRA in fp32 and bf16, both forms."""
    base = [(dtype, dict(style=style, momentum=momentum), lr_ptr, form)
            for dtype, style, momentum, lr_ptr, form in itertools.product(
                [torch.float32, torch.bfloat16, torch.float16], ["tf", "torch"], [0.0, 0.9],
                [False, True], ["flat", "table"])]
    extra = [(dtype, opts, True, form) for opts, dtype, form in itertools.product(
        RMSPROP_EXTRA, [torch.float32, torch.bfloat16], ["flat", "table"])]
    for dtype, opts, lr_ptr, form in base + extra:
        options = RMSpropOptions(alpha=0.9, eps=1e-5, **opts)
        shapes = [(3000,)] if form == "flat" else [(7, 5), (11,)]
        params = [torch.empty(s, dtype=dtype) for s in shapes]
        grads = [torch.empty(s, dtype=torch.float32 if form == "table" else dtype)
                 for s in shapes]

        def state():
            return [torch.empty(s) for s in shapes]

        lr = torch.empty(1) if lr_ptr else 1e-3
        compiler.context = f"{dtype} {form} " + " ".join(f"{k}={v}" for k, v in opts.items())
        rmsprop.rmsprop_step_(params, grads, state(), state() if options.momentum else [],
                              state() if options.centered else [], lr=lr, options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: Hopper)")
    parser.add_argument("--out", help="also write the per-variant table (markdown) here")
    parser.add_argument("--num-warps", type=int, default=None,
                        help="warps per program; default: what the launchers pass (Triton's "
                             "4 unless LOCOPROP_TRITON_WARPS is set)")
    args = parser.parse_args()
    if args.num_warps is not None:
        os.environ["LOCOPROP_TRITON_WARPS"] = str(args.num_warps)
    args.num_warps = int(os.environ.get("LOCOPROP_TRITON_WARPS") or 4)
    compiler = Compiler(GPUTarget("cuda", args.arch, 32), {"num_warps": args.num_warps})
    modules = (matched_loss_grad, local_targets, grouped, rmsprop)
    saved = [m.launch for m in modules]
    t0 = time.perf_counter()
    try:
        for m in modules:
            m.launch = compiler
        table_codes_match(compiler)
        per_layer_cases(compiler)
        grouped_cases(compiler)
        rmsprop_cases(compiler)
    finally:
        for m, launch in zip(modules, saved):
            m.launch = launch
    print(f"\n{len(compiler.seen)} kernel variants compiled for sm_{args.arch} "
          f"({args.num_warps} warps) with triton "
          f"{triton.__version__} in {time.perf_counter() - t0:.0f} s; "
          f"{len(compiler.failures)} failure(s)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Triton kernels compiled for sm_{args.arch}, {args.num_warps} warps "
                    f"(triton {triton.__version__})"
                    f"\n\n| variant | compile s | registers | stack bytes |\n|---|---:|---:|---:|\n")
            for label, seconds, regs, stack in compiler.rows:
                f.write(f"| {label} | {seconds:.1f} | {regs} | {stack} |\n")
    for failure in compiler.failures:
        print("FAILED:", failure)
    return 1 if compiler.failures else 0


if __name__ == "__main__":
    sys.exit(main())
