"""Bandwidth of the CUDA C++ multi-tensor RMSProp against a device-to-device copy, one run.

    LOCOPROP_CUDA=ON pip install --no-deps --no-build-isolation -e .   # on the GPU machine
    python bench/cuda_rmsprop_bandwidth.py [--repeats 50]

Over the deep autoencoder's 16 weights and biases (2.8M fp32 parameters), one
``rmsprop_step_(..., backend="cpp")`` moves 7 fp32 streams per element (reads p, g, ms, buf;
writes p, ms, buf). The copy moves 2 (read, write) of a buffer sized so that both move the
same number of bytes. Times are CUDA-event medians; writes bench/results/cuda-rmsprop-<gpu>.json.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

import locoprop_kernels as lk
from locoprop_kernels import cpp_backend

SIZES = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def cuda_median_ms(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    assert torch.cuda.is_available() and cpp_backend.build_info()["cuda"], \
        "needs a GPU and locoprop_kernels._C built with LOCOPROP_CUDA=ON"
    shapes = [s for a, b in zip(SIZES, SIZES[1:]) for s in ((b, a), (b,))]
    params, grads, ms, bufs = ([torch.randn(s, device="cuda") for s in shapes] for _ in range(4))
    ms = [m.abs() for m in ms]
    numel = sum(p.numel() for p in params)
    moved = 7 * 4 * numel
    step = lambda: lk.rmsprop_step_(params, grads, ms, bufs, lr=1e-5, style="torch",  # noqa
                                    backend="cpp")
    src = torch.empty(moved // 8, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    ours, theirs = cuda_median_ms(step, args.repeats), cuda_median_ms(copy, args.repeats)
    result = {"device": torch.cuda.get_device_name(), "params": numel, "bytes": moved,
              "rmsprop_ms": ours, "copy_ms": theirs, "rmsprop_GBps": moved / ours / 1e6,
              "copy_GBps": moved / theirs / 1e6, "ratio_to_copy": theirs / ours,
              "command": "python bench/cuda_rmsprop_bandwidth.py --repeats %d" % args.repeats}
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results"
    name = result["device"].replace(" ", "-").lower()
    (out / f"cuda-rmsprop-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
