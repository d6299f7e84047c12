"""Per-op microbenchmarks: our backends beside PyTorch eager, torch.compile of the
reference, and torch.optim.RMSprop(foreach=True), in one run on one device.

Shapes: the deep autoencoder's layers at batch 1000 (tiny stand-ins in smoke mode).
"""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import backends, reference
from locoprop_kernels.activations import ACTIVATIONS

from bench.conftest import AUTOENCODER, DEVICE, HAS_CUDA

OUR_BACKENDS = (["triton"] if HAS_CUDA else []) + (["cpp"] if backends.cpp_available() else [])
COMPETITORS = ["eager", "compile"] + OUR_BACKENDS


def _sizes(smoke):
    return [max(1, s // 50) for s in AUTOENCODER] if smoke else AUTOENCODER


def _layer(smoke, activation):
    B, d_in, d_out = (20, 16, 20) if smoke else (1000, 1000, 1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=g).to(DEVICE)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(DEVICE)
    b = torch.randn(d_out, generator=g).to(DEVICE)
    y = ACTIVATIONS[activation].f(torch.randn(B, d_out, generator=g)).to(DEVICE)
    return x, w, b, y


_compiled = {}


def _compiled_reference():
    if "mlg" not in _compiled:
        _compiled["mlg"] = torch.compile(reference.matched_loss_grad, dynamic=False)
    return _compiled["mlg"]


@pytest.mark.parametrize("who", COMPETITORS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_matched_loss_grad(timed, smoke, who, activation):
    x, w, b, y = _layer(smoke, activation)
    if who == "eager":
        fn = lambda: reference.matched_loss_grad(x, w, b, y, activation)  # noqa: E731
    elif who == "compile":
        compiled = _compiled_reference()
        fn = lambda: compiled(x, w, b, y, activation)  # noqa: E731
    else:
        fn = lambda: lk.matched_loss_grad(x, w, b, y, activation, backend=who)  # noqa: E731
    timed(f"matched_loss_grad[{activation}] B={x.shape[0]} {w.shape[1]}->{w.shape[0]}", who, fn)


def _autoencoder_params(smoke):
    sizes = _sizes(smoke)
    shapes = [s for a, b in zip(sizes, sizes[1:]) for s in ((b, a), (b,))]
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    return shapes, params, grads


@pytest.mark.parametrize("who", ["eager", "torch.optim.foreach"] + [
    f"{b}-{layout}" for b in OUR_BACKENDS for layout in ("arena", "list")])
def test_rmsprop_all_layers(timed, smoke, who):
    """One RMSProp step ("torch" flavour, momentum 0.9) over all 16 autoencoder tensors."""
    shapes, params, grads = _autoencoder_params(smoke)
    kw = dict(lr=1e-4, alpha=0.9, eps=1e-5, momentum=0.9)
    if who == "eager":
        ms = [torch.zeros_like(p) for p in params]
        bufs = [torch.zeros_like(p) for p in params]
        fn = lambda: reference.rmsprop_step_(params, grads, ms, bufs, style="torch", **kw)  # noqa
    elif who == "torch.optim.foreach":
        for p, g in zip(params, grads):
            p.grad = g
        opt = torch.optim.RMSprop(params, foreach=True, **kw)
        fn = opt.step
    else:
        backend, layout = who.split("-")
        if layout == "arena":
            args = [lk.Arena.from_tensors(params).buffer, lk.Arena.from_tensors(grads).buffer,
                    lk.Arena(shapes, device=DEVICE).buffer, lk.Arena(shapes, device=DEVICE).buffer]
        else:
            args = [params, grads, [torch.zeros_like(p) for p in params],
                    [torch.zeros_like(p) for p in params]]
        fn = lambda: lk.rmsprop_step_(*args, style="torch", backend=backend, **kw)  # noqa: E731
    timed(f"rmsprop 16 tensors ({sum(p.numel() for p in params)} params)", who, fn)
