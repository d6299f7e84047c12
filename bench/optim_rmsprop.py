"""lk.optim.RMSprop against torch's RMSprop, side by side in ONE run, on three parameter sets.

    .venv/bin/python -m bench.optim_rmsprop [--repeats 21] [--backend cpp] [--name optim-rmsprop-cpu]

Sets: 161 one-element parameters (the host cost per tensor alone: the kernel has nothing to
do), the deep autoencoder's 16 weights and biases (2.8M values) and the 161 parameter shapes
of ResNet-50 (25.6M values). Entries, all with torch's defaults (lr 1e-2, alpha 0.99, eps 1e-8,
no momentum) on fp32 parameters that already hold a gradient:
  ours                       lk.optim.RMSprop (one launch per step)
  torch foreach              torch.optim.RMSprop(foreach=True)
  torch.compile(foreach)     the same optimizer's step under torch.compile, lr a tensor (so a
                             new lr does not recompile)
  copy                       dst.copy_(src) over as many bytes as ours moves
and, on the one-element set, "ours, new grads" / "torch foreach, new grads": every step first
sets each .grad to another tensor (two prepared sets, alternating; what zero_grad() and
backward() do to the gradient objects), which ours re-checks per tensor.
Every entry runs once per round, round-robin, so this machine's drift hits them alike (on the
one-element set an entry's turn is 20 steps, timed together). The report gives each entry's
median and spread (min-max) and the PAIRWISE ratios to ours: per round, entry time / ours in
that round, median and min-max over the rounds. Bytes moved by ours per step: read p, g,
square_avg and write p, square_avg = 20 bytes per fp32 value; bandwidth = bytes / median time,
as a fraction of the copy's. Writes bench/results/<name>.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.cpu_suite import compare_times, machine
from bench.output import RESULTS, write_results

import locoprop_kernels as lk  # noqa: E402
from locoprop_kernels.experiments import autoencoder  # noqa: E402

BYTES_PER_VALUE = 5 * 4  # read p, g, ms; write p, ms (fp32, no momentum, not centered)


def autoencoder_shapes() -> list:
    sizes = autoencoder.layer_sizes()
    shapes = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        shapes += [(d_out, d_in), (d_out,)]
    return shapes


def resnet50_shapes() -> list:
    """The parameter shapes of torchvision's resnet50() in its parameters() order: a 7x7 stem,
    bottleneck stages of 3, 4, 6, 3 blocks (widths 64..512, expansion 4), a 1000-way head."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]

    def conv_bn(c_out, c_in, k):
        return [(c_out, c_in, k, k), (c_out,), (c_out,)]

    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += conv_bn(width, c_in, 1) + conv_bn(width, width, 3)
            shapes += conv_bn(4 * width, width, 1)
            if b == 0:
                shapes += conv_bn(4 * width, c_in, 1)  # the downsample projection
            c_in = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g).requires_grad_()
        p.grad = torch.randn(s, generator=g)
        params.append(p)
    return params


def entries_for(shapes, backend, calls: int = 1, new_grads: bool = False):
    """{entry: one round's call} and the values per parameter set; each call makes ``calls``
    steps. ``new_grads`` adds the entries that set fresh .grad objects before each step."""
    def repeat(step, params=None):
        if params is None:
            return step if calls == 1 else lambda: [step() for _ in range(calls)]
        # Two gradient sets with the same values, alternating: new objects every step.
        pools = [[p.grad for p in params], [p.grad.clone() for p in params]]

        def run():
            for k in range(calls):
                for p, g in zip(params, pools[k % 2]):
                    p.grad = g
                step()
        return run

    ours = lk.optim.RMSprop(_params(shapes), backend=backend)
    foreach = torch.optim.RMSprop(_params(shapes), foreach=True)
    compiled_opt = torch.optim.RMSprop(_params(shapes), lr=torch.tensor(1e-2), foreach=True)
    compiled_step = torch.compile(compiled_opt.step)
    numel = sum(p.numel() for p in ours.param_groups[0]["params"])
    src = torch.randn(numel * BYTES_PER_VALUE // 8)  # a copy reads and writes: 2 x 4 B each
    dst = torch.empty_like(src)
    entries = {"ours": repeat(ours.step), "torch foreach": repeat(foreach.step),
               "torch.compile(foreach)": repeat(compiled_step),
               "copy": repeat(lambda: dst.copy_(src))}
    if new_grads:
        ours_new = lk.optim.RMSprop(_params(shapes), backend=backend)
        foreach_new = torch.optim.RMSprop(_params(shapes), foreach=True)
        entries["ours, new grads"] = repeat(ours_new.step, ours_new.param_groups[0]["params"])
        entries["torch foreach, new grads"] = repeat(
            foreach_new.step, foreach_new.param_groups[0]["params"])
    return entries, numel


def one_element_shapes() -> list:
    return [(1,)] * 161


def pairwise(times: dict, base: str = "ours") -> dict:
    """{entry: (median, min, max)} over rounds of entry time / ``base`` time in that round."""
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        out[name] = (statistics.median(ratios), min(ratios), max(ratios))
    return out


#: name: (shapes, steps per timed call, with the new-grads entries)
SETS = {"one-element": (one_element_shapes, 20, True),
        "autoencoder": (autoencoder_shapes, 1, False),
        "resnet50": (resnet50_shapes, 1, False)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--backend", default=None, help="lk backend (default: auto)")
    parser.add_argument("--name", default="optim-rmsprop-cpu")
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args(argv)
    result = {"machine": machine(), "torch": torch.__version__, "threads":
              torch.get_num_threads(), "repeats": args.repeats, "command":
              " ".join(["python -m bench.optim_rmsprop", *(argv or sys.argv[1:])]), "sets": {}}
    lines = [f"# lk.optim.RMSprop vs torch.optim.RMSprop, {result['machine']}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{args.repeats} interleaved rounds; `{result['command']}`", ""]
    for name in args.sets.split(","):
        make_shapes, calls, new_grads = SETS[name]
        shapes = make_shapes()
        entries, numel = entries_for(shapes, args.backend, calls, new_grads)
        times = compare_times(entries, args.repeats, warmup=3)
        times = {k: [t / calls for t in v] for k, v in times.items()}  # seconds per step
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = pairwise(times)
        ours_bw = numel * BYTES_PER_VALUE / med["ours"]
        copy_bw = numel * BYTES_PER_VALUE / med["copy"]
        result["sets"][name] = dict(
            tensors=len(shapes), values=numel, steps_per_timed_call=calls, times=times,
            median=med, pairwise_ratio_to_ours=ratios,
            speedup_vs_foreach=ratios["torch foreach"][0],
            speedup_vs_compile=ratios["torch.compile(foreach)"][0],
            ours_gb_s=ours_bw / 1e9, copy_gb_s=copy_bw / 1e9,
            fraction_of_copy_bandwidth=ours_bw / copy_bw)
        r = result["sets"][name]
        per = "" if calls == 1 else f"; each timed call {calls} steps"
        lines += [f"## {name}: {len(shapes)} tensors, {numel:,} values{per}", "",
                  "| entry | median ms | min-max ms | time / ours, pairwise: median (min-max) |",
                  "|---|---:|---:|---:|"]
        for k, v in times.items():
            m, lo, hi = ratios[k]
            lines.append(f"| {k} | {med[k] * 1e3:.3f} | {min(v) * 1e3:.3f}-{max(v) * 1e3:.3f} "
                         f"| {m:.2f} ({lo:.2f}-{hi:.2f}) |")
        bandwidth = (f"; {r['ours_gb_s']:.1f} GB/s = "
                     f"{100 * r['fraction_of_copy_bandwidth']:.0f}% of the copy's "
                     f"{r['copy_gb_s']:.1f} GB/s ({BYTES_PER_VALUE} bytes per value)"
                     if calls == 1 else "")  # one-element steps move no data to speak of
        lines += ["", f"ours: {r['speedup_vs_foreach']:.2f}x faster than torch foreach, "
                  f"{r['speedup_vs_compile']:.2f}x than torch.compile(foreach) (pairwise "
                  f"medians){bandwidth}"]
        if new_grads:
            m, lo, hi = pairwise(times, "torch foreach")["ours"]
            m2, lo2, hi2 = pairwise(times, "torch foreach, new grads")["ours, new grads"]
            r["ours_over_foreach"] = (m, lo, hi)
            r["ours_over_foreach_new_grads"] = (m2, lo2, hi2)
            lines.append(f"ours / torch foreach, pairwise: {m:.2f} ({lo:.2f}-{hi:.2f}); "
                         f"with new grads every step {m2:.2f} ({lo2:.2f}-{hi2:.2f})")
        lines.append("")
    write_results(result, RESULTS / args.name, markdown="\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
