"""Compile every Triton kernel variant our launchers produce for a real GPU, without a GPU.

    python tools/triton_compile_check.py [--arch 90] [--out FILE] [--only GROUP,...]
                                                                        (make triton-check)

The tests run the kernels under Triton's interpreter, which executes them as numpy and never
compiles them: a kernel that the GPU compiler rejects (a dot with a tile edge under 16, a type
mix the interpreter tolerates, a constexpr misuse) would pass CI and break on the first GPU.
This script drives the real launchers (``triton_kernels/*.py``) over the cases the package
uses -- every activation, dtype (and mixed precision: half x and target, fp32 parameters),
bias/prox setting, dot precision ("ieee", "tf32", "bf16"), stage 1's delta form (anchor_preact,
on the extreme activations), both tile regimes, stage 2 both
unsplit and split over B (pass 1 and pass 2), the grouped kernels on the autoencoder's layer
table, a ragged one and a narrow one at a long batch (stage 1 in the delta form too, at
"tf32" and "bf16"), the Conv2d delta and finish
kernels, RMSProp flat and table forms with lr as a value and as a device pointer and with
torch's options (centered, maximize, weight decay) -- but replaces the launch with
``triton.compile`` for the target (sm_90 by default) on the signature, constexprs and launch
options (num_warps, num_stages from ``triton_kernels/config_table.py``) the launch would have
had. It FAILS on
  - any compile error;
  - a dot whose instructions are not what the precision asks (PTX): "ieee" must not use the
    tensor cores (fp32 FMAs), "tf32" must use tf32 mma/wgmma, "bf16" bf16 ones;
  - a spill: per-thread local memory (the cubin's stack frame, ``cuobjdump``) above 0 bytes.
    Triton's ``CompiledKernel.n_spills`` is that size / 4 (the driver's local size), so this
    is the GPU's number, read without a GPU; registers likewise (``n_regs``) and shared memory
    from the compiled metadata (``shared``).
``--out`` writes the resources per shipped config row (the worst variant of each).
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
    activation, config_table, configs, conv_matched_loss_grad as conv,
    grouped_matched_loss_grad as grouped, local_targets, matched_loss_grad, rmsprop)

LOOKUP = configs.lookup

# Tensor dtype -> Triton pointer type; Python scalars as Triton's launcher types them.
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
           torch.int64: "*i64"}
PRECISIONS = ("ieee", "tf32", "bf16")
# The kernels that hold a dot (conv_matched_loss_grad's _delta_kernel has none: it is told
# apart by its module).
DOT_KERNELS = {("matched_loss_grad", "_delta_kernel"), ("matched_loss_grad", "_weight_grad_kernel"),
               ("matched_loss_grad", "_anchored_delta_kernel"),
               ("matched_loss_grad", "_weight_grad_partial_kernel"),
               ("grouped_matched_loss_grad", "_grouped_delta_kernel"),
               ("grouped_matched_loss_grad", "_grouped_anchored_delta_kernel"),
               ("grouped_matched_loss_grad", "_grouped_weight_grad_kernel"),
               ("grouped_matched_loss_grad", "_grouped_weight_grad_partial_kernel")}
# The kernel family (configs.KERNELS) of each (module, kernel) the config table serves; pass 2
# of a split stage 2 (the _sum kernels) has fixed tiles (matched_loss_grad.SUM_*) and no row.
FAMILY = {("matched_loss_grad", "_delta_kernel"): "delta",
          ("matched_loss_grad", "_anchored_delta_kernel"): "delta",
          ("matched_loss_grad", "_weight_grad_kernel"): "weight_grad",
          ("matched_loss_grad", "_weight_grad_partial_kernel"): "weight_grad",
          ("grouped_matched_loss_grad", "_grouped_weight_grad_partial_kernel"):
              "grouped_weight_grad",
          ("grouped_matched_loss_grad", "_grouped_delta_kernel"): "grouped_delta",
          ("grouped_matched_loss_grad", "_grouped_anchored_delta_kernel"): "grouped_delta",
          ("grouped_matched_loss_grad", "_grouped_weight_grad_kernel"): "grouped_weight_grad",
          ("local_targets", "_targets_kernel"): "targets",
          ("conv_matched_loss_grad", "_delta_kernel"): "conv_delta"}
# The matrix instructions in PTX and the operand type each precision must give them.
MMA_LINE = re.compile(r"^\s*(wgmma\.mma_async|mma\.sync)\S*", re.M)
MMA_TYPE = {"tf32": ".tf32", "bf16": ".bf16"}
# Shared memory one block may use on sm_90 (227 KB, H100/H200): a launch above it fails.
SHARED_LIMIT = 232448
# The deep autoencoder's layers (docs/design.md section 2): the grouped kernels' real table.
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


def module_of(kernel) -> str:
    return kernel.fn.__module__.rsplit(".", 1)[-1]


class Compiler:
    """Stands in for ``_launch.launch``: compiles each distinct (kernel, signature, constexprs,
    launch options) once for ``target`` and records what came out, under the config-table row
    the launcher looked up last for that kernel family (``configs.lookup`` is wrapped)."""

    def __init__(self, target: GPUTarget):
        self.target = target
        self.seen = {}
        self.rows = []      # (label, config key, seconds, regs, spills, shared)
        self.failures = []
        self.failed_rows = set()  # the config-table rows (or "-") of the failures
        self.context = ""
        self.config_key = {}  # kernel family -> the table row of its latest lookup
        nvidia_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        cuobjdump = os.path.join(nvidia_bin, "cuobjdump")
        self.cuobjdump = cuobjdump if os.path.exists(cuobjdump) else None

    def lookup(self, kernel, dtype, precision="-", *, softmax=None, shape=(1,)):
        """``configs.lookup``, recording which table row answered."""
        cfg = LOOKUP(kernel, dtype, precision, softmax=softmax, shape=shape)
        act = {True: "softmax", False: "elementwise",
               None: configs.ACT_OF.get(kernel, "-")}[softmax]
        for shape_cls in (configs.shape_class(shape), "any"):
            row = configs.key(kernel, act, configs.dtype_class(dtype), precision, shape_cls)
            if row in config_table.TABLE:
                self.config_key[kernel] = row
                break
        return cfg

    def __call__(self, kernel, grid, *args, **constexprs):
        options = {"num_warps": 4}
        for name in ("num_warps", "num_stages", "enable_fp_fusion"):  # launch options
            if name in constexprs:
                options[name] = constexprs.pop(name)
        names = kernel.arg_names
        runtime = [n for n in names if n not in constexprs]
        signature = {n: arg_type(v) for n, v in zip(runtime, args)}
        signature.update({n: "constexpr" for n in constexprs})
        signature = {n: signature[n] for n in names}
        where = (module_of(kernel), kernel.__name__)
        family = FAMILY.get(where)
        row = self.config_key.get(family, "-") if family else "-"
        key = (where, tuple(signature.items()),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               tuple(sorted(options.items())))
        if key in self.seen:
            return
        label = f"{kernel.__name__} {self.context} " + " ".join(
            f"{k}={v}" for k, v in constexprs.items()
            if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK")) + \
            f" tiles={[constexprs[k] for k in ('BLOCK_M', 'BLOCK_N', 'BLOCK_K') if k in constexprs]}" \
            f" warps={options['num_warps']} stages={options.get('num_stages', '-')}"
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                      target=self.target, options=options)
        except Exception as err:  # noqa: BLE001 - every compiler error is a finding
            self.failures.append(f"{label}: {type(err).__name__}: {str(err)[:1500]}")
            self.failed_rows.add(row)
            self.seen[key] = None
            print(f"FAIL {label}", flush=True)
            return
        seconds = time.perf_counter() - t0
        ptx = compiled.asm.get("ptx", "")
        regs, stack = self._resources(compiled.asm.get("cubin"))
        spills = stack // 4 if isinstance(stack, int) else "?"
        shared = compiled.metadata.shared
        problems = [p for p in (
            self._check_precision(where, constexprs, ptx),
            self._check_fma(kernel.__name__, constexprs, ptx),
            f"spills: {stack} bytes of local memory per thread (n_spills={spills}) in the "
            f"shipped config {row}" if isinstance(stack, int) and stack > 0 else "",
            f"shared memory {shared} B over sm_90's {SHARED_LIMIT} B per block in {row}"
            if shared > SHARED_LIMIT else "",
            "no resource report (cuobjdump missing): spills unchecked"
            if spills == "?" else "") if p]
        for problem in problems:
            self.failures.append(f"{label}: {problem}")
            self.failed_rows.add(row)
        self.seen[key] = compiled
        self.rows.append((label, row, seconds, regs, spills, shared))
        print(f"{'FAIL' if problems else 'ok  '} {label}  {seconds:.1f}s regs={regs} "
              f"spills={spills} shared={shared}", flush=True)

    @staticmethod
    def _check_precision(where, constexprs: dict, ptx: str) -> str:
        if where not in DOT_KERNELS:
            return ""
        precision = constexprs["PRECISION"]
        mma = [m.group(0) for m in MMA_LINE.finditer(ptx)]
        if precision == "ieee":
            return (f"precision='ieee' compiled to tensor-core instructions ({mma[0]})"
                    if mma else "")
        if not mma:
            return f"precision={precision!r} compiled without tensor-core instructions"
        wrong = [m for m in mma if MMA_TYPE[precision] not in m]
        if wrong:
            return f"precision={precision!r} compiled to {wrong[0]} (not {MMA_TYPE[precision]})"
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
        """(registers, stack frame bytes) per thread of the cubin's kernel."""
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


# Activations that bound the register pressure of the element-wise epilogue (gelu_tanh: the
# longest f) and the row loop (softmax), for the variants that repeat a kernel at another
# bias/dtype setting; the full activation list runs once per config row.
EXTREME_ACTS = ("softmax", "gelu_tanh")


def _layer(B, K, N, dtype, has_bias, param_dtype=None):
    p = param_dtype or dtype
    x, y = torch.empty(B, K, dtype=dtype), torch.empty(B, N, dtype=dtype)
    w, b = torch.empty(N, K, dtype=p), torch.empty(N, dtype=p) if has_bias else None
    return x, w, b, y


def _matched_loss_grad(x, w, b, y, act, has_prox, precision):
    matched_loss_grad.matched_loss_grad_into(
        x, w, b, y, act.code, 1.0, w if has_prox else None,
        b if has_prox and b is not None else None, 0.5 if has_prox else None,
        torch.empty_like(w), torch.empty_like(b) if b is not None else None,
        precision=precision)


def per_layer_cases(compiler: Compiler) -> None:
    """matched_loss_grad (2 kernels, stage 2 split: 3) and local_targets through their
    launchers: every activation at every (dtype, precision) config row at full tiles; bias
    off, prox on/off and the 16-wide tiles of tiny layers on the extreme activations; the
    unsplit stage 2 at full tiles (a batch of 2 row blocks) beside the split one."""
    # (B, d_in, d_out): the configs' full tiles (edges up to 128) with stage 2 split over B
    # (configs.split_k_slices: 1000 rows, <= 64 tiles on the assumed 132 SMs), the same
    # unsplit (128 rows: S = 1 at B <= 2 BLOCK_M), and the 16-wide minimum.
    full, short, tiny = (1000, 1000, 1000), (128, 1000, 1000), (5, 3, 7)
    for dtype, precision, act in itertools.product(
            [torch.float32, torch.bfloat16, torch.float16], PRECISIONS, ACTIVATIONS.values()):
        extreme = act.name in EXTREME_ACTS
        if dtype == torch.float16 and not extreme:
            continue  # fp16 compiles as bf16 does (same loads and widths)
        compiler.context = f"{dtype} {act.name}"
        for has_bias, has_prox in [(True, False)] + ([(False, True)] if extreme else []):
            _matched_loss_grad(*_layer(*full, dtype, has_bias), act, has_prox, precision)
            _matched_loss_grad(*_layer(*short, dtype, has_bias), act, has_prox, precision)
        if extreme and dtype == torch.float32:
            compiler.context = f"{dtype} {act.name} tiny"
            _matched_loss_grad(*_layer(*tiny, dtype, True), act, True, precision)
    for dtype, act, variant in itertools.product(
            [torch.float32, torch.bfloat16], ACTIVATIONS.values(), ["M", "S"]):
        if variant == "S" and act.name != "tanh":
            continue  # variant S launches the identity code: one variant
        y = torch.empty(full[0], full[2], dtype=dtype)
        compiler.context = f"{dtype} {act.name}"
        local_targets.local_targets_into(y, y, act.code, 10.0, variant, torch.empty_like(y))
    # Mixed precision (half x and target, fp32 weight, bias, anchors and outputs: what
    # torch.autocast records): the same kernels specialised on mixed pointer types.
    for low, act_name, precision in itertools.product(
            [torch.bfloat16, torch.float16], EXTREME_ACTS, PRECISIONS):
        compiler.context = f"{low} operands, fp32 params {act_name}"
        for shape in (full, short):
            _matched_loss_grad(*_layer(*shape, low, True, torch.float32),
                               ACTIVATIONS[act_name], True, precision)


def grouped_cases(compiler: Compiler) -> None:
    """The grouped kernels on the autoencoder's 8 layers at B = 1000 (stage 2 split for the
    128-wide tensor-core tiles, unsplit for "ieee") and B = 128 (unsplit), a ragged table with
    softmax and leaky_relu, and a narrow table at B = 4096 (split at every precision); the
    code is run-time data there, so every activation is in each variant."""
    for (name, (sizes, acts, batches)), dtype, has_prox, precision in itertools.product(
            GROUPED_TABLES.items(), [torch.float32, torch.bfloat16], [False, True],
            PRECISIONS):
        if name == "ragged" and (has_prox or dtype != torch.float32):
            continue  # the same kernels at smaller tiles: once
        for batch in batches:
            _grouped_launch(compiler, name, sizes, acts, batch, dtype, has_prox, precision)


#: The grouped cases' layer tables: (widths, activations, batch sizes).
GROUPED_TABLES = {
    "autoencoder": (AUTOENCODER, AUTOENCODER_ACTS, (1000, 128)),
    "ragged": ([7, 1, 33, 5, 9], ["softmax", "relu", "sigmoid", "leaky_relu"], (3,)),
    "narrow": ([64, 48, 64], ["softmax", "tanh"], (4096,))}


def _grouped_launch(compiler: Compiler, name, sizes, acts, batch, dtype, has_prox, precision,
                    anchored=False) -> None:
    """One grouped call on the trainer's layout (LayerGroup's arenas and layer rows), planned
    as the triton backend plans it; the reference backend only stands in for building the
    group. ``anchored``: stage 1 in the delta form."""
    group = LayerGroup([LayerSpec(d_in, d_out, act) for d_in, d_out, act
                        in zip(sizes, sizes[1:], acts)], batch, device="cpu",
                       dtype=dtype, backend="reference", anchored=anchored)
    plan = grouped.plan(batch, group.layer_table(), "cpu", dtype=dtype, precision=precision,
                        anchored=anchored)
    params = torch.empty(group.num_params, dtype=dtype)
    delta_form = {} if not anchored else dict(start_params=group.start_params,
                                              anchor_preacts=group.anchor_preacts.buffer)
    compiler.context = (f"{dtype} {name} B={batch} S={plan.n_slices}"
                        + (" delta form" if anchored else ""))
    grouped.grouped_matched_loss_grad_(
        plan, group.inputs.buffer, params, group.targets.buffer,
        torch.empty(group.targets.buffer.shape), torch.empty(group.num_params),
        anchors=params if has_prox else None, eta=0.5 if has_prox else None, **delta_form)


def grouped_delta_form_cases(compiler: Compiler) -> None:
    """The grouped stage 1 in the delta form (``_grouped_anchored_delta_kernel``: W and W0
    loaded per layer, Z0 and b - b0 added in the epilogue), on the grouped cases' tables at
    "tf32" and "bf16" (the precisions LocoProp takes it at), fp32 and bf16 arenas, under the
    "grouped_delta" rows it shares with the plain kernel. Stage 2 is the plain one's (prox
    off here: it does not touch stage 1; ``grouped_cases`` compiles both settings)."""
    for (name, (sizes, acts, batches)), dtype, precision in itertools.product(
            GROUPED_TABLES.items(), [torch.float32, torch.bfloat16], ("tf32", "bf16")):
        if name == "ragged" and dtype != torch.float32:
            continue  # the same kernels at smaller tiles: once
        for batch in batches:
            _grouped_launch(compiler, name, sizes, acts, batch, dtype, False, precision,
                            anchored=True)


def conv_cases(compiler: Compiler) -> None:
    """The Conv2d matched loss's Triton parts (the GEMMs are torch's): the delta epilogue for
    every activation (bias on; off on the extremes), fp32 and bf16 targets, at full tiles;
    the finish kernel with and without prox and bias."""
    R, N, K = 4096, 256, 27  # output positions, C_out, C_in/groups * kh * kw
    for act, dtype in itertools.product(ACTIVATIONS.values(), [torch.float32, torch.bfloat16]):
        compiler.context = f"conv {dtype} {act.name}"
        for has_bias in [True] + ([False] if act.name in EXTREME_ACTS else []):
            conv.delta_rows_(torch.empty(R, N),
                             torch.empty(N, dtype=dtype) if has_bias else None,
                             torch.empty(R, N, dtype=dtype), act.code)
    for has_prox, has_bias, dtype in itertools.product([False, True], [True, False],
                                                       [torch.float32, torch.bfloat16]):
        compiler.context = f"conv {dtype} bias={has_bias}"
        w = torch.empty(N, K, dtype=dtype)
        b = torch.empty(N, dtype=dtype) if has_bias else None
        conv.finish_into(torch.empty(N, K), torch.empty(R, N), w, w if has_prox else None, b,
                         b if has_prox else None, 1.0, 0.5 if has_prox else None,
                         torch.empty_like(w), torch.empty_like(b) if has_bias else None)


def delta_form_cases(compiler: Compiler) -> None:
    """Stage 1's delta form (``_anchored_delta_kernel``: W and W0 loaded, Z0 and b - b0 added
    in the epilogue) under the "delta" config rows it shares with ``_delta_kernel``: the
    extreme activations at every (dtype, precision) row, full and short shapes, bias on and
    off, and mixed precision (half x and target, fp32 parameters and Z0). Stage 2 is the
    plain form's (already compiled by per_layer_cases)."""
    full, short = (1000, 1000, 1000), (128, 1000, 1000)
    for dtype, precision, act_name in itertools.product(
            [torch.float32, torch.bfloat16], PRECISIONS, EXTREME_ACTS):
        compiler.context = f"{dtype} {act_name} delta form"
        for shape, has_bias in itertools.product((full, short), (True, False)):
            x, w, b, y = _layer(*shape, dtype, has_bias)
            matched_loss_grad.delta(x, w, b, y, ACTIVATIONS[act_name].code,
                                    precision=precision, anchor_preact=torch.empty_like(y),
                                    anchor_weight=w, anchor_bias=b)
    for low, act_name, precision in itertools.product(
            [torch.bfloat16], EXTREME_ACTS, ("tf32", "bf16")):
        compiler.context = f"{low} operands, fp32 params {act_name} delta form"
        x, w, b, y = _layer(*full, low, True, torch.float32)
        matched_loss_grad.delta(x, w, b, y, ACTIVATIONS[act_name].code, precision=precision,
                                anchor_preact=torch.empty(y.shape), anchor_weight=w,
                                anchor_bias=b)


GROUPS = {"codes": table_codes_match, "per_layer": per_layer_cases,
          "delta_form": delta_form_cases, "grouped": grouped_cases,
          "grouped_delta_form": grouped_delta_form_cases,
          "conv": conv_cases, "rmsprop": None}  # rmsprop_cases, defined below


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


GROUPS["rmsprop"] = rmsprop_cases


def resources_table(compiler: Compiler, arch: int) -> str:
    """Markdown: per config-table row, its config and the worst compiled variant's registers,
    spills and shared memory; the kernels without a row (RMSProp, conv finish) per kernel."""
    worst = {}
    for label, row, _, regs, spills, shared in compiler.rows:
        name = row if row != "-" else label.split()[0]
        w = worst.setdefault(name, dict(variants=0, regs=0, spills=0, shared=0))
        w["variants"] += 1
        for field, value in (("regs", regs), ("spills", spills), ("shared", shared)):
            w[field] = value if not isinstance(value, int) else max(w[field], value)
    lines = [f"| config row (kernel/activation/dtype/precision/shape) | tiles (M, N, K) | warps "
             f"| stages | variants | max n_regs | max n_spills | max shared B |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(worst):
        w = worst[name]
        cfg = config_table.TABLE.get(name)
        shape = (f"{cfg['block_m']}, {cfg['block_n']}, {cfg['block_k']} | {cfg['num_warps']} | "
                 f"{cfg['num_stages']}" if cfg else "(fixed in the kernel) | 4 | -")
        lines.append(f"| {name} | {shape} | {w['variants']} | {w['regs']} | {w['spills']} | "
                     f"{w['shared']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: Hopper)")
    parser.add_argument("--out", help="also write the per-config resource table (markdown)")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated case groups (default all: {','.join(GROUPS)})")
    args = parser.parse_args()
    groups = args.only.split(",")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; known: {list(GROUPS)}")
    compiler = Compiler(GPUTarget("cuda", args.arch, 32))
    modules = (matched_loss_grad, local_targets, grouped, conv, rmsprop)
    saved = [m.launch for m in modules]
    t0 = time.perf_counter()
    try:
        for m in modules:
            m.launch = compiler
        configs.lookup = compiler.lookup
        for g in groups:
            GROUPS[g](compiler)
    finally:
        for m, launch in zip(modules, saved):
            m.launch = launch
        configs.lookup = LOOKUP
    print(f"\n{len(compiler.seen)} kernel variants compiled for sm_{args.arch} with triton "
          f"{triton.__version__} in {time.perf_counter() - t0:.0f} s; "
          f"{len(compiler.failures)} failure(s)")
    table = resources_table(compiler, args.arch)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Triton kernels compiled for sm_{args.arch} (triton {triton.__version__}):"
                    f" resources per shipped config\n\n{table}\n## Variants\n\n"
                    f"| variant | config row | compile s | n_regs | n_spills | shared B |\n"
                    f"|---|---|---:|---:|---:|---:|\n")
            for label, row, seconds, regs, spills, shared in compiler.rows:
                f.write(f"| {label} | {row} | {seconds:.1f} | {regs} | {spills} | {shared} |\n")
    for failure in compiler.failures:
        print("FAILED:", failure)
    return 1 if compiler.failures else 0


if __name__ == "__main__":
    sys.exit(main())
