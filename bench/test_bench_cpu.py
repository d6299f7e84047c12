"""CPU microbenchmarks of the "cpp" backend against its fair peers (pytest-benchmark).

- multi-layer RMSProp over the autoencoder's 16 weights and biases, flavour "torch" with
  momentum: cpp vs torch.optim.RMSprop(foreach=True) (the baseline here is "eager" = the
  reference's per-tensor loop, as in the other groups);
- one LocoProp-M outer step (T = 10) as a loop over the ops, cpp vs reference, beside its
  GEMMs alone (the floor).
Smoke mode (CI, ``--benchmark-disable``) runs each once at tiny sizes. The full side-by-side
table with ratios and targets is ``bench/cpu_suite.py``.
"""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import backends

from bench import cpu_suite
from bench.conftest import AUTOENCODER, HAS_CUDA

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="CPU benchmarks (the GPU has bench/gpu_suite.py)"),
    pytest.mark.skipif(not backends.cpp_available(), reason="locoprop_kernels._C not built"),
]


def _sizes(smoke):
    return [max(2, s // 50) for s in AUTOENCODER] if smoke else AUTOENCODER


@pytest.mark.parametrize("who", ["eager", "torch.optim(foreach)", "cpp", "cpp-arena"])
def test_multi_layer_rmsprop(timed, smoke, who):
    shapes, params = cpu_suite.make_layers(0, _sizes(smoke))
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    kw = dict(lr=1e-5, alpha=0.9, eps=1e-5, momentum=0.999)
    ms = [torch.zeros_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    if who == "torch.optim(foreach)":
        for p, g in zip(params, grads):
            p.requires_grad_().grad = g
        fn = torch.optim.RMSprop(params, foreach=True, **kw).step
    else:
        state = [params, grads, ms, bufs]
        if who == "cpp-arena":
            state = [lk.Arena.from_tensors(ts).buffer for ts in state]
        backend = "reference" if who == "eager" else "cpp"
        fn = lambda: lk.rmsprop_step_(*state, style="torch", backend=backend, **kw)  # noqa: E731
    timed("rmsprop all layers (torch flavour, momentum)", who, fn)
    if smoke:
        assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("who", ["eager", "cpp", "gemm-floor"])
def test_outer_step(timed, smoke, who):
    sizes = _sizes(smoke)
    batch = 8 if smoke else cpu_suite.BATCH
    x = torch.rand(batch, sizes[0])
    if who == "gemm-floor":
        floor = cpu_suite.GemmFloor(sizes, batch)
        fn = lambda: floor(x)  # noqa: E731
    else:
        step = cpu_suite.OuterStep("reference" if who == "eager" else who, sizes=sizes)
        fn = lambda: step(x)  # noqa: E731
    timed(f"LocoProp outer step T={cpu_suite.INNER_STEPS} B={batch}", who, fn)
