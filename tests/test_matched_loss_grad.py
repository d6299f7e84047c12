"""matched_loss_grad on every backend vs the float64 reference."""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import reference
from locoprop_kernels.activations import ACTIVATIONS

from conftest import BACKENDS, DEVICE, f64, rel_err

# (B, d_in, d_out): ones, odd primes, powers of two, and a tile edge plus one.
SHAPES = [(1, 1, 1), (7, 33, 5), (16, 8, 32), (33, 17, 257), (64, 65, 7)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _layer(B, d_in, d_out, activation, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g) if bias else None
    y = ACTIVATIONS[activation].f(torch.randn(B, d_out, generator=g))
    w0 = w + 0.1 * torch.randn(d_out, d_in, generator=g)
    b0 = b + 0.1 * torch.randn(d_out, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(x), to(w), to(b), to(y), to(w0), to(b0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_matches_reference(backend, activation, shape, bias, prox):
    B = shape[0]
    x, w, b, y, w0, b0 = _layer(*shape, activation, bias)
    kw = dict(scale=1.0 / B if prox else 1.0, eta=0.5 if prox else None,
              anchor_weight=w0 if prox else None, anchor_bias=b0 if prox else None)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, backend=backend, **kw)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation,
                                         scale=kw["scale"], eta=kw["eta"],
                                         anchor_weight=f64(kw["anchor_weight"]),
                                         anchor_bias=f64(kw["anchor_bias"]))
    assert gw.dtype == w.dtype and gw.shape == w.shape
    assert rel_err(gw, rw) <= 1e-5
    if bias:
        assert rel_err(gb, rb) <= 1e-5
    else:
        assert gb is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_half_storage_fp32_math(backend, dtype, activation):
    """Half inputs: the result is the reference on the same (rounded) inputs, to half's
    own rounding of the output."""
    x, w, b, y, _, _ = _layer(19, 24, 13, activation, True, dtype=dtype)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, backend=backend)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation)
    assert gw.dtype == dtype
    assert rel_err(gw, rw) <= TOL[dtype] and rel_err(gb, rb) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_huge_logits_stay_finite(backend):
    """Logits of magnitude 1e4: the row max is subtracted, nothing overflows."""
    B, d_in, d_out = 5, 3, 37
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, d_in, generator=g).to(DEVICE)
    w = (1e4 / 3 * torch.randn(d_out, d_in, generator=g)).to(DEVICE)
    b = (1e4 * torch.randn(d_out, generator=g)).to(DEVICE)
    y = torch.softmax(torch.randn(B, d_out, generator=g), -1).to(DEVICE)
    z = x @ w.T + b
    assert z.abs().max() > 5e3
    gw, gb = lk.matched_loss_grad(x, w, b, y, "softmax", backend=backend)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "softmax")
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_writes_into_arena_views(backend):
    """out= writes straight into views of one flat buffer and touches nothing else."""
    x, w, b, y, _, _ = _layer(9, 6, 11, "tanh", True)
    arena = lk.Arena([(3,), w.shape, b.shape, (2,)], device=DEVICE, fill=-7.0)
    _, gw_view, gb_view, _ = arena.views()
    out = lk.matched_loss_grad(x, w, b, y, "tanh", out=(gw_view, gb_view), backend=backend)
    assert out[0] is gw_view and out[1] is gb_view
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "tanh")
    assert rel_err(gw_view, rw) <= 1e-5 and rel_err(gb_view, rb) <= 1e-5
    assert (arena[0] == -7).all() and (arena[3] == -7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_outputs(backend):
    """Transposed, sliced and stride-0 (expanded) inputs; a transposed output."""
    x, w, b, y, _, _ = _layer(12, 10, 8, "sigmoid", True)
    x_t = x.T.contiguous().T                      # column-major x
    w_s = torch.cat([w, w], 1)[:, ::2]            # strided weight, same values
    w_s.copy_(w)
    y_e = y[:1].expand_as(y)                      # stride-0 target
    out_w = torch.empty(w.shape[1], w.shape[0], device=DEVICE).T
    lk.matched_loss_grad(x_t, w_s, b, y_e, "sigmoid", out=(out_w, torch.empty_like(b)),
                         backend=backend)
    rw, _ = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y_e), "sigmoid")
    assert rel_err(out_w, rw) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_two_launches_per_call(backend):
    x, w, b, y, _, _ = _layer(9, 6, 11, "softmax", True)
    with lk.testing.count_launches() as n:
        lk.matched_loss_grad(x, w, b, y, "softmax", backend=backend)
    assert getattr(n, backend) == 2
