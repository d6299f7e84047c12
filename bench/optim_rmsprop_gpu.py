"""lk.optim.RMSprop on a GPU: bandwidth against a copy, and capture in a CUDA graph.

    python -m bench.optim_rmsprop_gpu [--repeats 50]      (bench/device_run.sh runs it)

1. Bandwidth, torch's defaults (no momentum, not centered: 20 bytes moved per fp32 value):
   one 2^26-value parameter and the 161 parameter shapes of ResNet-50; entries
   lk.optim.RMSprop on each CUDA backend (triton; cpp when _C has CUDA),
   torch.optim.RMSprop(foreach=True), and dst.copy_(src) over the same bytes. CUDA-event
   medians; GB/s and the fraction of the copy's.
2. capturable=True: the ResNet-50 shapes, lr a CUDA tensor; three eager steps, then
   ``opt.step()`` captured in a CUDA graph and replayed, the lr tensor changed between replays;
   the parameters must equal an eager twin's bit for bit after every replay.
Writes bench/results/optim-rmsprop-<gpu>.json.
"""
from __future__ import annotations

import argparse
import json

import torch

from bench.gpu_suite import median_ms
from bench.optim_rmsprop import BYTES_PER_VALUE, resnet50_shapes
from bench.output import RESULTS, write_results

import locoprop_kernels as lk  # noqa: E402
from locoprop_kernels import backends  # noqa: E402


def _params(shapes, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g, device="cuda").requires_grad_()
        p.grad = torch.randn(s, generator=g, device="cuda")
        params.append(p)
    return params


def _cuda_backends():
    names = ["triton"]
    if backends.cpp_available():
        from locoprop_kernels.backends import cpp
        if cpp.build_info()["cuda"]:
            names.append("cpp")
    return names


def bandwidth(shapes, repeats):
    numel = sum(torch.Size(s).numel() for s in shapes)
    src = torch.empty(numel * BYTES_PER_VALUE // 8, device="cuda")
    dst = torch.empty_like(src)
    entries = {f"lk.optim.RMSprop ({b})": lk.optim.RMSprop(_params(shapes), backend=b).step
               for b in _cuda_backends()}
    entries["torch foreach"] = torch.optim.RMSprop(_params(shapes), foreach=True).step
    entries["copy"] = lambda: dst.copy_(src)
    ms = {k: median_ms(fn, "cuda", reps=repeats, warmup=3) for k, fn in entries.items()}
    moved = numel * BYTES_PER_VALUE
    return {"tensors": len(shapes), "values": numel, "bytes": moved, "median_ms": ms,
            "GB_s": {k: moved / v / 1e6 for k, v in ms.items()},
            "fraction_of_copy": {k: ms["copy"] / v for k, v in ms.items()}}


def capture(shapes, replays=5):
    lr = torch.tensor(1e-2, device="cuda")
    lr_eager = torch.tensor(1e-2, device="cuda")
    graphed, eager = _params(shapes), _params(shapes)
    opt = lk.optim.RMSprop(graphed, lr=lr, capturable=True, momentum=0.9, backend="triton")
    twin = lk.optim.RMSprop(eager, lr=lr_eager, capturable=True, momentum=0.9,
                            backend="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch recommends
        for _ in range(3):
            opt.step()
            twin.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    equal = []
    for r in range(replays):
        value = 1e-2 * 0.5 ** r
        lr.fill_(value)
        lr_eager.fill_(value)
        graph.replay()
        twin.step()
        torch.cuda.synchronize()
        equal.append(all(torch.equal(a, b) for a, b in zip(graphed, eager)))
    return {"replays": replays, "bitwise_equal_to_eager": equal, "ok": all(equal)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "flat_2^26": bandwidth([(1 << 26,)], args.repeats),
              "resnet50_161": bandwidth(resnet50_shapes(), args.repeats),
              "capturable_graph": capture(resnet50_shapes()),
              "command": f"python -m bench.optim_rmsprop_gpu --repeats {args.repeats}"}
    print(json.dumps(result, indent=1))
    name = result["device"].replace(" ", "-").lower()
    write_results(result, RESULTS / f"optim-rmsprop-{name}")


if __name__ == "__main__":
    main()
