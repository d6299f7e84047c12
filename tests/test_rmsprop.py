"""rmsprop_step_ on every backend: "torch" vs torch.optim.RMSprop, "tf" vs its formulas,
one launch for many tensors (flat arena and plain lists)."""
import math

import pytest
import torch

import locoprop_kernels as lk

from conftest import BACKENDS, DEVICE

# The autoencoder's weight/bias shapes, shrunk, plus odd sizes: 8 tensors of different shapes.
SHAPES = [(7, 5), (7,), (3, 7), (3,), (1, 1), (1,), (33, 17), (1025,)]


def _tensors(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(DEVICE, dtype) for s in shapes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_style_matches_torch_optim(backend, momentum):
    """20 steps against torch.optim.RMSprop(foreach=False), fresh gradients every step."""
    params = _tensors(SHAPES, 0)
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.RMSprop(theirs, lr=1e-2, alpha=0.9, eps=1e-5, momentum=momentum,
                              foreach=False)
    ms = [torch.zeros_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params] if momentum else None
    for step in range(20):
        grads = _tensors(SHAPES, 100 + step)
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        lk.rmsprop_step_(params, grads, ms, bufs, lr=1e-2, alpha=0.9, eps=1e-5,
                         momentum=momentum, style="torch", backend=backend)
    for p, t in zip(params, theirs):
        torch.testing.assert_close(p, t.detach(), rtol=1e-5, atol=1e-6)


def _tf_formulas(p, g, ms, mom, lr, alpha, eps, momentum):
    """TF1 RMSProp written out element by element in float64 (docs/design.md section 2)."""
    out = []
    for pi, gi, si, mi in zip(p.tolist(), g.tolist(), ms.tolist(), mom.tolist()):
        si = alpha * si + (1 - alpha) * gi * gi
        mi = momentum * mi + lr * gi / math.sqrt(si + eps)
        out.append((pi - mi, si, mi))
    return [torch.tensor(c, dtype=torch.float64) for c in zip(*out)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf_style_matches_formulas(backend):
    shapes = [(37,), (5, 3)]
    params = _tensors(shapes, 1)
    ms = [torch.ones_like(p) for p in params]
    mom = [torch.zeros_like(p) for p in params]
    want = [[p.double().flatten(), torch.ones(p.numel(), dtype=torch.float64),
             torch.zeros(p.numel(), dtype=torch.float64)] for p in params]
    for step in range(5):
        grads = _tensors(shapes, 10 + step)
        lk.rmsprop_step_(params, grads, ms, mom, lr=1e-3 * (step + 1), alpha=0.9, eps=1e-5,
                         momentum=0.999, style="tf", backend=backend)
        for w, g in zip(want, grads):
            w[:] = _tf_formulas(*w[:1], g.double().flatten().cpu(), *w[1:],
                                lr=1e-3 * (step + 1), alpha=0.9, eps=1e-5, momentum=0.999)
    for p, s, m, (wp, ws, wm) in zip(params, ms, mom, want):
        torch.testing.assert_close(p.double().flatten().cpu(), wp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.double().flatten().cpu(), ws, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.double().flatten().cpu(), wm, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["tf", "torch"])
@pytest.mark.parametrize("layout", ["arena", "list"])
def test_all_tensors_one_launch(backend, style, layout):
    """8 tensors of different shapes: one launch, same result as the reference."""
    params = _tensors(SHAPES, 2)
    grads = _tensors(SHAPES, 3)
    fill = 1.0 if style == "tf" else 0.0
    want = [p.clone() for p in params]
    want_ms = [torch.full_like(p, fill) for p in params]
    want_buf = [torch.zeros_like(p) for p in params]
    lk.reference.rmsprop_step_(want, grads, want_ms, want_buf, lr=0.1, momentum=0.5,
                               style=style)
    if layout == "arena":
        p_arena = lk.Arena.from_tensors(params)
        g_arena = lk.Arena.from_tensors(grads)
        ms_arena = lk.Arena(SHAPES, device=DEVICE, fill=fill)
        buf_arena = lk.Arena(SHAPES, device=DEVICE)
        args = (p_arena.buffer, g_arena.buffer, ms_arena.buffer, buf_arena.buffer)
        results = p_arena.views()
    else:
        ms = [torch.full_like(p, fill) for p in params]
        args = (params, grads, ms, [torch.zeros_like(p) for p in params])
        results = params
    with lk.testing.count_launches() as n:
        lk.rmsprop_step_(*args, lr=0.1, momentum=0.5, style=style, backend=backend)
    if backend != "reference":
        assert getattr(n, backend) == 1
    for got, w in zip(results, want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_dtype", ["same", "fp32"])
def test_half_params_fp32_state(backend, dtype, grad_dtype):
    """Half params with fp32 state: the update is computed in fp32 and rounded once."""
    params = _tensors(SHAPES, 4, dtype)
    grads = _tensors(SHAPES, 5, dtype if grad_dtype == "same" else torch.float32)
    ms = [torch.ones(p.shape, device=DEVICE) for p in params]
    bufs = [torch.zeros(p.shape, device=DEVICE) for p in params]
    want = [p.float() for p in params]
    want_ms = [m.clone() for m in ms]
    want_bufs = [b.clone() for b in bufs]
    lk.reference.rmsprop_step_(want, [g.float() for g in grads], want_ms, want_bufs, lr=0.1)
    lk.rmsprop_step_(params, grads, ms, bufs, lr=0.1, backend=backend)
    for p, w, m, wm in zip(params, want, ms, want_ms):
        assert p.dtype == dtype
        # one rounding of the fp32 result to the half format (an ulp: 2^-7 bf16, 2^-10 fp16)
        torch.testing.assert_close(p.float(), w, rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(m, wm, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_state_is_updated_in_place(backend):
    """A non-contiguous parameter (a column slice) is updated where it lives."""
    base = torch.randn(6, 8, device=DEVICE)
    p = base[:, ::2]
    g = torch.randn(6, 4, device=DEVICE)
    want = p.clone()
    lk.reference.rmsprop_step_([want], [g], [torch.ones(6, 4, device=DEVICE)], None, lr=0.1,
                               momentum=0.0)
    lk.rmsprop_step_(p, g, torch.ones(6, 4, device=DEVICE), None, lr=0.1, momentum=0.0,
                     backend=backend)
    torch.testing.assert_close(base[:, ::2], want)
