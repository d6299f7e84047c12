"""GPU-only checks: native bf16/fp16 inputs through the Triton GEMMs, tf32, large shapes.

The interpreter cannot run a bf16 tl.dot (NOTES: it multiplies bit patterns), and tf32 only
exists on the GPU, so these run on the device and skip cleanly elsewhere.
"""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import reference
from locoprop_kernels.activations import ACTIVATIONS

from conftest import f64, rel_err, requires_gpu

pytestmark = [requires_gpu, pytest.mark.gpu]


def _layer(B, d_in, d_out, activation, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g)
    y = ACTIVATIONS[activation].f(torch.randn(B, d_out, generator=g))
    return [t.to("cuda", dtype) for t in (x, w, b, y)]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_on_gpu(activation, dtype):
    x, w, b, y = _layer(1000, 784, 1000, activation, dtype)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, scale=1e-3, backend="triton")
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation, scale=1e-3)
    assert rel_err(gw, rw) <= 2e-2 and rel_err(gb, rb) <= 2e-2


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-5), ("tf32", 5e-3)])
def test_fp32_large_shapes(activation, precision, tol):
    x, w, b, y = _layer(1000, 1000, 500, activation, torch.float32)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, backend="triton", precision=precision)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation)
    assert rel_err(gw, rw) <= tol and rel_err(gb, rb) <= tol


def test_softmax_wide_rows_on_gpu():
    x, w, b, y = _layer(64, 32, 10000, "softmax", torch.float32)
    w = w * 1e4
    gw, gb = lk.matched_loss_grad(x, w, b, y, "softmax", backend="triton")
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "softmax")
    assert torch.isfinite(gw).all() and rel_err(gw, rw) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rmsprop_autoencoder_arena_on_gpu(dtype):
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    shapes = [s for a, b in zip(sizes, sizes[1:]) for s in ((b, a), (b,))]
    p = lk.Arena(shapes, dtype=dtype, device="cuda", fill=None)
    p.buffer.normal_()
    g = torch.randn_like(p.buffer)
    ms, buf = torch.ones_like(p.buffer, dtype=torch.float32), torch.zeros_like(p.buffer, dtype=torch.float32)
    want = [p.buffer.float().clone(), ms.clone(), buf.clone()]
    lk.reference.rmsprop_step_([want[0]], [g.float()], [want[1]], [want[2]], lr=1e-3)
    with lk.testing.count_launches() as n:
        lk.rmsprop_step_(p.buffer, g, ms, buf, lr=1e-3, backend="triton")
    assert n.triton == 1
    # fp32: the same IEEE operations as the reference, a few ulps of |p| ~ 1 (the update itself
    # is ~1e-3, so an atol near it would not test the kernel). Half params: one rounding of
    # the updated value to the storage dtype.
    if dtype == torch.float32:
        torch.testing.assert_close(p.buffer, want[0], rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(p.buffer.float(), want[0], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ms, want[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(buf, want[2], rtol=1e-5, atol=1e-9)
