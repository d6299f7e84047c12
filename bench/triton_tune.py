"""Choose the Triton launch configs (``triton_kernels/config_table.py``) and write the table.

    python bench/triton_tune.py --compile-only          # no GPU: first spill-free candidate
    python bench/triton_tune.py --time --out $OUT       # on a lent GPU: the fastest of them
    python bench/triton_tune.py --dry-run               # print the plan; compiles nothing

Every config row (``configs.py``: kernel / activation class / dtype class / precision / shape
class) has a list of candidates, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), in order
of preference; the stage-2 rows (weight_grad, grouped_weight_grad) add split_k, the cap on the
slices of the split over B (``configs.split_k_slices``), SPLIT_K_DEFAULT until timed. A
candidate is admissible only if its representative launches compile for sm_90 without spills
and within sm_90's shared memory (``tools/triton_compile_check.py``'s compiler; on a GPU the
compiled kernel's own ``n_spills``). The representative launches are the variants the compile
check found to be the worst of a row: bias on and off, prox on and off, full and 16-wide
tiles, stage 2 split and unsplit, and for the grouped rows the ragged table. (Launching only
the bias-and-prox case once let a 3-stage weight_grad fp32/tf32 through that needs 245760 B
of shared memory without bias, and a grouped fp32/ieee BLOCK_K 64 that spills on the ragged
table; both rows were then fixed by hand without resource numbers.)
- ``--compile-only`` ships the first admissible candidate per row (chosen_by="compile-check",
  with its n_regs / n_spills / shared).
- ``--time`` times, on the GPU, every admissible candidate of the rows the timed shapes use
  (TIMED_SHAPES, the issue's per-op shapes), interleaved, and ships the fastest as a
  "large" row (chosen_by="timed", the card, every candidate's median and spread in ms); the
  other rows keep the compile-check choice. The weight_grad rows are timed at every
  admissible tile candidate times every split cap of SPLIT_K_CAPS (the cap does not change
  the compiled code, only the grid: no new compile). It writes the table into the package
  (``--write``, the default with --time) and a copy under --out.
The preference order is a guess until timed: larger tiles first, then more warps, then
deeper pipelines for the tensor-core precisions (their operands stream through shared memory),
one stage for "ieee" (the FMA path keeps its operand tiles in registers: stages there cost
registers and spill).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE_PATH = ROOT / "triton_kernels" / "config_table.py"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), in order of preference.
GEMM_IEEE = [(64, 64, 64, 8, 1), (64, 64, 32, 8, 1), (64, 64, 32, 4, 1), (32, 64, 32, 4, 1),
             (32, 32, 32, 4, 1), (32, 32, 16, 4, 1)]
GEMM_TC = [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 8, 3),
           (64, 64, 32, 4, 3), (64, 64, 32, 8, 2), (64, 64, 32, 8, 1), (32, 64, 32, 4, 1),
           (32, 32, 32, 4, 1), (32, 32, 16, 4, 1)]
# Row kernels (no dot: BLOCK_K unused); softmax walks whole rows.
ROWS = [(64, 64, 16, 4, 1), (32, 64, 16, 4, 1), (32, 32, 16, 4, 1), (16, 32, 16, 4, 1)]

#: The split cap shipped untimed, and the caps the timing sweeps (1: never split).
SPLIT_K_DEFAULT = 8
SPLIT_K_CAPS = (1, 2, 4, 8, 16)
#: The kernel families whose rows carry split_k.
SPLIT_KERNELS = ("weight_grad", "grouped_weight_grad")

PRECISIONS = ("ieee", "tf32", "bf16")
DTYPES = ("fp32", "half")
#: The issue's per-op shapes (B, d_in, d_out): the rows the timing step chooses.
TIMED_SHAPES = [(1000, 1000, 1000), (8192, 768, 3072)]


def rows() -> dict:
    """config-table key -> candidate list, for every row the launchers look up ("any")."""
    from locoprop_kernels.triton_kernels import configs
    out = {}
    for dt, p in itertools.product(DTYPES, PRECISIONS):
        gemm = GEMM_IEEE if p == "ieee" else GEMM_TC
        for act in ("softmax", "elementwise"):
            out[configs.key("delta", act, dt, p, "any")] = gemm
        split = [c + (SPLIT_K_DEFAULT,) for c in gemm]
        out[configs.key("weight_grad", "-", dt, p, "any")] = split
        out[configs.key("grouped_delta", "mixed", dt, p, "any")] = gemm
        out[configs.key("grouped_weight_grad", "-", dt, p, "any")] = split
    for dt, act in itertools.product(DTYPES, ("softmax", "elementwise")):
        out[configs.key("targets", act, dt, "-", "any")] = ROWS
        out[configs.key("conv_delta", act, dt, "-", "any")] = ROWS
    return out


def as_row(candidate, chosen_by: str, **extra) -> dict:
    """A table row from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, split_k])."""
    bm, bn, bk, w, st = candidate[:5]
    split = dict(split_k=candidate[5]) if len(candidate) > 5 else {}
    return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, **split,
                chosen_by=chosen_by, **extra)


def load_compile_check():
    """tools/triton_compile_check.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "triton_compile_check", ROOT / "tools" / "triton_compile_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def representative_launch(tc, key: str, quick: bool = False) -> None:
    """Launch (through whatever ``launch`` the modules hold) the worst cases of a row: the
    softmax or gelu_tanh epilogue; bias on without prox and off with prox (the shared
    memory differs); full tiles with stage 2 split (B = 1000) and unsplit (B = 128) and the
    16-wide tiles of a tiny layer; the grouped kernels on the autoencoder's table (B = 1000
    and 128), the ragged one and a narrow one at B = 4096 (split at every precision).
    ``quick`` (the timing step, where compiles eat the device's minutes): per-op only the
    split case with bias and the unsplit one with prox (``make triton-check`` still checks
    the shipped table in full)."""
    import torch
    from locoprop_kernels.activations import ACTIVATIONS
    kernel, act, dt, precision, _ = key.split("/")
    dtype = torch.float32 if dt == "fp32" else torch.bfloat16
    f = ACTIVATIONS["softmax" if act == "softmax" else "gelu_tanh"]
    if kernel in ("delta", "weight_grad"):
        cases = [((1000, 1000, 1000), True, False), ((128, 1000, 1000), False, True)]
        if not quick:
            cases += [((1000, 1000, 1000), False, True), ((128, 1000, 1000), True, False),
                      ((5, 3, 7), True, True)]
        for shape, has_bias, has_prox in cases:
            tc._matched_loss_grad(*tc._layer(*shape, dtype, has_bias), f, has_prox, precision)
    elif kernel == "targets":
        y = torch.empty(1000, 1000, dtype=dtype)
        tc.local_targets.local_targets_into(y, y, f.code, 10.0, "M", torch.empty_like(y))
    elif kernel == "conv_delta":
        for has_bias in (True, False):
            tc.conv.delta_rows_(torch.empty(4096, 256),
                                torch.empty(256, dtype=dtype) if has_bias else None,
                                torch.empty(4096, 256, dtype=dtype), f.code)
    else:  # the grouped kernels
        from locoprop_kernels.grouped import LayerGroup, LayerSpec
        tables = [(tc.AUTOENCODER, tc.AUTOENCODER_ACTS, 1000),
                  (tc.AUTOENCODER, tc.AUTOENCODER_ACTS, 128),
                  ([7, 1, 33, 5, 9], ["softmax", "relu", "sigmoid", "leaky_relu"], 3),
                  ([64, 48, 64], ["softmax", "tanh"], 4096)]
        for (sizes, acts, batch), has_prox in itertools.product(tables, (False, True)):
            group = LayerGroup([LayerSpec(i, o, a) for i, o, a in zip(sizes, sizes[1:], acts)],
                               batch, device="cpu", dtype=dtype, backend="reference")
            plan = tc.grouped.plan(batch, group.layer_table(), "cpu", dtype=dtype,
                                   precision=precision)
            params = torch.empty(group.num_params, dtype=dtype)
            tc.grouped.grouped_matched_loss_grad_(
                plan, group.inputs.buffer, params, group.targets.buffer,
                torch.empty(group.targets.buffer.shape), torch.empty(group.num_params),
                anchors=params if has_prox else None, eta=0.5 if has_prox else None)


def admissible(tc, key: str, cand, quick: bool = False) -> dict | None:
    """Compile ``key``'s representative launches (``quick``: the timing step's subset) with
    ``cand`` for sm_90 (this machine's Triton): the worst n_regs / n_spills / shared when all
    compile spill-free within sm_90's shared memory, else None."""
    from locoprop_kernels.triton_kernels import config_table, configs
    compiler = tc.Compiler(tc.GPUTarget("cuda", 90, 32))
    modules = (tc.matched_loss_grad, tc.local_targets, tc.grouped, tc.conv)
    saved = [m.launch for m in modules]
    config_table.TABLE[key] = as_row(cand, "probe")
    try:
        for m in modules:
            m.launch = compiler
        configs.lookup = compiler.lookup
        representative_launch(tc, key, quick)
    finally:
        for m, launch in zip(modules, saved):
            m.launch = launch
        configs.lookup = tc.LOOKUP
    mine = [r for r in compiler.rows if r[1] == key]
    if not mine or key in compiler.failed_rows:
        return None
    return {f: max(r[i] for r in mine) for f, i in (("n_regs", 3), ("n_spills", 4),
                                                    ("shared", 5))}


def compile_only(candidates: dict) -> dict:
    """The first candidate of each row whose representative launch compiles spill-free."""
    tc = load_compile_check()
    table = {}
    for key, cands in candidates.items():
        for cand in cands:
            worst = admissible(tc, key, cand)
            print(f"{'ok  ' if worst else 'no  '} {key} {cand} {worst}", flush=True)
            if worst:
                table[key] = as_row(cand, "compile-check", **worst)
                break
        else:
            raise SystemExit(f"no spill-free candidate for {key}: extend its list")
    return table


def write_table(table: dict, card, note: str, path: Path = TABLE_PATH) -> None:
    from locoprop_kernels.triton_kernels import configs
    path.write_text(configs.render_table(table, card, note))
    print(f"wrote {path}")


# ---------------------------------------------------------------------------- GPU timing
def bench_ms(fn) -> float:
    """One call of fn() in ms, between CUDA events."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_rows(table: dict, candidates: dict, reps: int, budget_s: float) -> dict:
    """On the GPU: per timed shape, per per-op row (delta softmax/elementwise, weight_grad)
    of the three (dtype class, precision) pairs the results step times, every admissible
    candidate timed interleaved (round-robin over candidates, ``reps`` rounds); the fastest
    median becomes the shape's "large" row."""
    import torch
    from locoprop_kernels.activations import ACTIVATIONS
    from locoprop_kernels.triton_kernels import config_table, configs, matched_loss_grad
    card = torch.cuda.get_device_name()
    t_end = time.perf_counter() + budget_s
    out = dict(table)
    pairs = [("fp32", "ieee"), ("fp32", "tf32"), ("half", "bf16")]
    for (dt, precision), act in itertools.product(pairs, ("softmax", "elementwise")):
        dtype = torch.float32 if dt == "fp32" else torch.bfloat16
        f = ACTIVATIONS["softmax" if act == "softmax" else "tanh"]
        for kernel in ("delta", "weight_grad"):
            if kernel == "weight_grad" and act == "softmax":
                continue  # stage 2 has no activation: timed once per pair
            key_any = configs.key(kernel, act if kernel == "delta" else "-", dt, precision,
                                  "any")
            tc = load_compile_check()
            fits = [c for c in candidates[key_any] if admissible(tc, key_any, c, quick=True)]
            if kernel in SPLIT_KERNELS:  # the cap changes the grid only: same compiled code
                fits = [c[:5] + (cap,) for c in fits for cap in SPLIT_K_CAPS]
            medians = {c: [] for c in fits}
            for B, K, N in TIMED_SHAPES:
                g = torch.Generator(device="cuda").manual_seed(0)
                x = torch.randn(B, K, device="cuda", generator=g).to(dtype)
                w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(dtype)
                b = torch.randn(N, device="cuda", generator=g).to(dtype)
                y = torch.randn(B, N, device="cuda", generator=g).to(dtype)
                gw, gb = torch.empty_like(w), torch.empty_like(b)
                d = torch.empty(B, N, device="cuda")

                def run():
                    if kernel == "delta":
                        matched_loss_grad.delta(x, w, b, y, f.code, precision=precision, out=d)
                    else:
                        matched_loss_grad.matched_loss_grad_into(
                            x, w, b, y, f.code, 1.0, None, None, None, gw, gb,
                            precision=precision)
                times = {c: [] for c in fits}
                for c in fits:  # warm-up: the JIT compile and first launch stay out
                    config_table.TABLE[key_any] = as_row(c, "timing")
                    run()
                torch.cuda.synchronize()
                for _ in range(reps):
                    for c in fits:  # interleaved: one call of each per round
                        config_table.TABLE[key_any] = as_row(c, "timing")
                        times[c].append(bench_ms(run))
                for c in fits:
                    medians[c].append((statistics.median(times[c]),
                                       max(times[c]) - min(times[c])))
                if time.perf_counter() > t_end:
                    print(f"tuning budget spent at {key_any}", flush=True)
                    break
            if not fits:
                continue
            best = min(fits, key=lambda c: sum(m for m, _ in medians[c]))
            out[key_any] = dict(out[key_any])  # the compile-check row stays for small shapes
            out[key_any.replace("/any", "/large")] = as_row(
                best, "timed", card=card,
                ms={str(c): [round(m, 4) for m, _ in medians[c]] for c in fits},
                spread_ms={str(c): [round(s, 4) for _, s in medians[c]] for c in fits},
                shapes=[list(s) for s in TIMED_SHAPES])
            config_table.TABLE[key_any] = table[key_any]
            print(f"{key_any}: best {best} of {len(fits)}", flush=True)
            if time.perf_counter() > t_end:
                return out
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile-only", action="store_true")
    mode.add_argument("--time", action="store_true")
    mode.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default=None, help="folder for a JSON copy of the table")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="stop timing new rows after this many seconds")
    parser.add_argument("--no-write", action="store_true",
                        help="do not rewrite triton_kernels/config_table.py")
    args = parser.parse_args(argv)
    candidates = rows()
    if args.dry_run:
        n = sum(len(c) for c in candidates.values())
        print(f"{len(candidates)} config rows, {n} candidates; timed shapes {TIMED_SHAPES}")
        for key, cands in candidates.items():
            print(f"  {key}: {cands}")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("triton_tune: unset TRITON_INTERPRET (compiling needs the real JIT)")
    if args.compile_only:
        table = compile_only(candidates)
        card, note = None, ("compile check only (no GPU): the first spill-free candidate per "
                            "row of bench/triton_tune.py's preference order; not timed")
    else:
        import torch
        from locoprop_kernels.triton_kernels import config_table
        table = {k: dict(v) for k, v in config_table.TABLE.items()}
        table = time_rows(table, candidates, args.reps, args.budget_s)
        card = torch.cuda.get_device_name()
        note = (f"rows chosen_by='timed': the fastest spill-free candidate on {card} at "
                f"{TIMED_SHAPES} (medians of {args.reps} interleaved rounds, ms per shape); "
                f"the rest: compile check")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "triton-config-table.json").write_text(
            json.dumps(dict(card=card, note=note, table=table), indent=1, default=str))
    if not args.no_write:
        write_table(table, card, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
