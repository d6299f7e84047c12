"""Bandwidth of the CUDA C++ multi-tensor RMSProp against a device-to-device copy, one run.

    LOCOPROP_CUDA=ON pip install --no-deps --no-build-isolation -e .   # on the GPU machine
    python -m bench.cuda_rmsprop_bandwidth [--repeats 50]

One ``rmsprop_step_(..., backend="cpp")`` in the "torch" flavour with momentum moves 7 fp32
streams per element (reads p, g, ms, buf; writes p, ms, buf); the copy moves 2 (read, write) of
a buffer sized so that both move the same number of bytes. Two cases:
- the deep autoencoder's 16 weights and biases (2.8M parameters, ~78 MB moved): at HBM speed
  that is tens of microseconds, so the op layer's host time can show in the event timing;
  this is the time a user sees per step;
- one flat arena of 2^26 parameters (~1.9 GB moved): the kernel dominates, this is the
  bandwidth figure.
Times are CUDA-event medians; writes bench/results/cuda-rmsprop-<gpu>.json.
"""
import argparse
import json

import torch

import locoprop_kernels as lk
from bench.gpu_suite import SIZES, median_ms  # the same timing as the GPU suite
from bench.output import RESULTS, write_results
from locoprop_kernels.backends import cpp as cpp_backend

BIG_ARENA = 1 << 26  # 256 MB per fp32 stream: far past L2 (50 MB on H100), kernel-bound


def measure(shapes, repeats: int) -> dict:
    """Times one cpp RMSProp step over tensors of ``shapes`` and a copy of the same bytes."""
    params, grads, ms, bufs = ([torch.randn(s, device="cuda") for s in shapes]
                               for _ in range(4))
    ms = [m.abs() for m in ms]
    numel = sum(p.numel() for p in params)
    moved = 7 * 4 * numel

    def step():
        lk.rmsprop_step_(params, grads, ms, bufs, lr=1e-5, style="torch", backend="cpp")

    src = torch.empty(moved // 8, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ours = median_ms(step, "cuda", reps=repeats, warmup=3)
    theirs = median_ms(lambda: dst.copy_(src), "cuda", reps=repeats, warmup=3)
    return {"tensors": len(shapes), "params": numel, "bytes": moved, "rmsprop_ms": ours,
            "copy_ms": theirs, "rmsprop_GBps": moved / ours / 1e6,
            "copy_GBps": moved / theirs / 1e6, "rmsprop_over_copy_bandwidth": theirs / ours}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not (torch.cuda.is_available() and cpp_backend.build_info()["cuda"]):
        raise SystemExit("needs a GPU and locoprop_kernels._C built with LOCOPROP_CUDA=ON")
    autoencoder = [s for a, b in zip(SIZES, SIZES[1:]) for s in ((b, a), (b,))]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "autoencoder_16_tensors": measure(autoencoder, args.repeats),
              "flat_arena_2^26": measure([(BIG_ARENA,)], args.repeats),
              "command": f"python -m bench.cuda_rmsprop_bandwidth --repeats {args.repeats}"}
    print(json.dumps(result, indent=2))
    name = result["device"].replace(" ", "-").lower()
    write_results(result, RESULTS / f"cuda-rmsprop-{name}", indent=2)


if __name__ == "__main__":
    main()
