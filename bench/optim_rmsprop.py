"""lk.optim.RMSprop against torch's RMSprop, side by side in ONE run, on two parameter sets.

    .venv/bin/python -m bench.optim_rmsprop [--repeats 15] [--backend cpp] [--name optim-rmsprop-cpu]

Sets: the deep autoencoder's 16 weights and biases (2.8M values) and the 161 parameter shapes
of ResNet-50 (25.6M values). Entries, all with torch's defaults (lr 1e-2, alpha 0.99, eps 1e-8,
no momentum) on fp32 parameters that already hold a gradient:
  ours                       lk.optim.RMSprop (one launch per step)
  torch foreach              torch.optim.RMSprop(foreach=True)
  torch.compile(foreach)     the same optimizer's step under torch.compile, lr a tensor (so a
                             new lr does not recompile)
  copy                       dst.copy_(src) over as many bytes as ours moves
Every entry runs once per round, round-robin, so this machine's drift hits them alike; the
report gives the median, the spread (min-max) and ratios to ours. Bytes moved by ours per step:
read p, g, square_avg and write p, square_avg = 20 bytes per fp32 value; bandwidth = bytes /
median time, as a fraction of the copy's. Writes bench/results/<name>.json and .md.
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


def entries_for(shapes, backend) -> dict:
    ours = lk.optim.RMSprop(_params(shapes), backend=backend)
    foreach = torch.optim.RMSprop(_params(shapes), foreach=True)
    compiled_opt = torch.optim.RMSprop(_params(shapes), lr=torch.tensor(1e-2), foreach=True)
    compiled_step = torch.compile(compiled_opt.step)
    numel = sum(p.numel() for p in ours.param_groups[0]["params"])
    src = torch.randn(numel * BYTES_PER_VALUE // 8)  # a copy reads and writes: 2 x 4 B each
    dst = torch.empty_like(src)
    return {"ours": ours.step, "torch foreach": foreach.step,
            "torch.compile(foreach)": compiled_step,
            "copy": lambda: dst.copy_(src)}, numel


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default=None, help="lk backend (default: auto)")
    parser.add_argument("--name", default="optim-rmsprop-cpu")
    parser.add_argument("--sets", default="autoencoder,resnet50")
    args = parser.parse_args(argv)
    sets = {"autoencoder": autoencoder_shapes, "resnet50": resnet50_shapes}
    result = {"machine": machine(), "torch": torch.__version__, "threads":
              torch.get_num_threads(), "repeats": args.repeats, "command":
              " ".join(["python -m bench.optim_rmsprop", *(argv or sys.argv[1:])]), "sets": {}}
    lines = [f"# lk.optim.RMSprop vs torch.optim.RMSprop, {result['machine']}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{args.repeats} interleaved rounds; `{result['command']}`", ""]
    for name in args.sets.split(","):
        shapes = sets[name]()
        entries, numel = entries_for(shapes, args.backend)
        times = compare_times(entries, args.repeats, warmup=3)
        med = {k: statistics.median(v) for k, v in times.items()}
        ours_bw = numel * BYTES_PER_VALUE / med["ours"]
        copy_bw = numel * BYTES_PER_VALUE / med["copy"]
        result["sets"][name] = dict(
            tensors=len(shapes), values=numel, times=times, median=med,
            speedup_vs_foreach=med["torch foreach"] / med["ours"],
            speedup_vs_compile=med["torch.compile(foreach)"] / med["ours"],
            ours_gb_s=ours_bw / 1e9, copy_gb_s=copy_bw / 1e9,
            fraction_of_copy_bandwidth=ours_bw / copy_bw)
        r = result["sets"][name]
        lines += [f"## {name}: {len(shapes)} tensors, {numel / 1e6:.1f}M values", "",
                  "| entry | median ms | min-max ms | time / ours |", "|---|---:|---:|---:|"]
        for k, v in times.items():
            lines.append(f"| {k} | {med[k] * 1e3:.2f} | {min(v) * 1e3:.2f}-{max(v) * 1e3:.2f} "
                         f"| {med[k] / med['ours']:.2f} |")
        lines += ["", f"ours: {r['speedup_vs_foreach']:.2f}x faster than torch foreach, "
                  f"{r['speedup_vs_compile']:.2f}x than torch.compile(foreach); "
                  f"{r['ours_gb_s']:.1f} GB/s = {100 * r['fraction_of_copy_bandwidth']:.0f}% of "
                  f"the copy's {r['copy_gb_s']:.1f} GB/s ({BYTES_PER_VALUE} bytes per value)", ""]
    write_results(result, RESULTS / args.name, markdown="\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
