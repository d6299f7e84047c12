"""matched_loss_grad on every backend vs the float64 reference."""
import pytest
import torch

import locoprop_kernels as lk
from locoprop_kernels import reference
from locoprop_kernels.activations import ACTIVATIONS

from conftest import BACKENDS, DEVICE, f64, rel_err, random_layer

# (B, d_in, d_out): ones, odd primes, powers of two, and a tile edge plus one.
SHAPES = [(1, 1, 1), (7, 33, 5), (16, 8, 32), (33, 17, 257), (64, 65, 7)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


_layer = random_layer  # x, W, b, y, W0, b0 (conftest)


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


# ---------------------------------------------------------------- the delta form (anchor_preact)

def _delta_form_reference(x, w, b, y, activation, z0, w0, b0, scale, eta):
    """float64: Z = Z0 + X (W - W0)^T + (b - b0), D = f(Z) - Y, the gradients as
    ``reference.matched_loss_grad`` (the prox term with eta only)."""
    x, w, b, y, z0, w0, b0 = map(f64, (x, w, b, y, z0, w0, b0))
    z = z0 + x @ (w - w0).T + (0.0 if b is None else b - b0)
    d = ACTIVATIONS[activation].f(z) - y
    gw, gb = scale * d.T @ x, None if b is None else scale * d.sum(0)
    if eta is not None:
        gw = gw + (w - w0) / eta
        gb = None if b is None else gb + (b - b0) / eta
    return gw, gb


def _anchored_layer(shape, activation, bias, seed=0):
    """A layer, its W0, b0 and a Z0 that is NOT X W0^T + b0 (off by O(1)): the op's result
    then depends on which Z it forms, so a backend that ignored Z0 or W0 would fail."""
    x, w, b, y, w0, b0 = _layer(*shape, activation, bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    z0 = x @ w0.T + (0.0 if b0 is None else b0)
    z0 = z0 + 0.3 * torch.randn(z0.shape, generator=g).to(DEVICE)
    return x, w, b, y, z0, w0, b0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(7, 33, 5), (16, 8, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_delta_form_matches_reference(backend, activation, shape, bias, prox):
    """anchor_preact Z0: the op computes Z = Z0 + X (W - W0)^T + (b - b0) on every backend,
    odd and power-of-two shapes, every activation, with or without bias and prox."""
    x, w, b, y, z0, w0, b0 = _anchored_layer(shape, activation, bias)
    scale, eta = (1.0 / shape[0], 0.5) if prox else (1.0, None)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, scale=scale, eta=eta,
                                  anchor_weight=w0, anchor_bias=b0, anchor_preact=z0,
                                  backend=backend)
    rw, rb = _delta_form_reference(x, w, b, y, activation, z0, w0, b0, scale, eta)
    assert rel_err(gw, rw) <= 1e-5
    assert gb is None if not bias else rel_err(gb, rb) <= 1e-5
    # Not the plain form's result: Z0 was given away from X W0^T + b0 on purpose.
    plain, _ = lk.matched_loss_grad(x, w, b, y, activation, scale=scale, eta=eta,
                                    anchor_weight=w0, anchor_bias=b0, backend=backend)
    assert rel_err(plain, rw) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "softmax"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_delta_form_every_shape(backend, activation, shape):
    x, w, b, y, z0, w0, b0 = _anchored_layer(shape, activation, True, seed=4)
    gw, gb = lk.matched_loss_grad(x, w, b, y, activation, anchor_weight=w0, anchor_bias=b0,
                                  anchor_preact=z0, backend=backend)
    rw, rb = _delta_form_reference(x, w, b, y, activation, z0, w0, b0, 1.0, None)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_form_is_the_plain_form_at_the_recorded_z0(backend):
    """With Z0 = X W0^T + b0 the delta form is the same function as the plain one."""
    x, w, b, y, w0, b0 = _layer(13, 9, 11, "tanh", True, seed=2)
    z0 = (f64(x) @ f64(w0).T + f64(b0)).float()
    gw, gb = lk.matched_loss_grad(x, w, b, y, "tanh", anchor_weight=w0, anchor_bias=b0,
                                  anchor_preact=z0, backend=backend)
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "tanh")
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
def test_delta_form_half_z0_under_fp32_weight(backend, low):
    """Z0 follows target's dtype rule: a half Z0 (what autocast records) under an fp32
    weight is upcast exactly."""
    x, w, b, y, z0, w0, b0 = _anchored_layer((9, 12, 10), "sigmoid", True, seed=3)
    z0 = z0.to(low)
    gw, gb = lk.matched_loss_grad(x, w, b, y, "sigmoid", anchor_weight=w0, anchor_bias=b0,
                                  anchor_preact=z0, backend=backend)
    rw, rb = _delta_form_reference(x, w, b, y, "sigmoid", z0, w0, b0, 1.0, None)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


def _bad_delta_form_calls(x, w, b, y, z0, w0, b0):
    """(what is wrong, keywords, error type, message fragment)."""
    return [
        ("no anchor_weight", dict(anchor_preact=z0, anchor_bias=b0), ValueError,
         "anchor_weight"),
        ("no anchor_bias with a bias", dict(anchor_preact=z0, anchor_weight=w0), ValueError,
         "anchor_bias"),
        ("Z0 of the wrong shape", dict(anchor_preact=z0[:, :-1], anchor_weight=w0,
                                       anchor_bias=b0), ValueError, "anchor_preact"),
        ("Z0 transposed", dict(anchor_preact=z0.T.contiguous().reshape(z0.shape[::-1]),
                               anchor_weight=w0, anchor_bias=b0), ValueError, "anchor_preact"),
        ("Z0 of a wrong dtype", dict(anchor_preact=z0.double(), anchor_weight=w0,
                                     anchor_bias=b0), TypeError, "anchor_preact"),
        ("Z0 not a tensor", dict(anchor_preact=z0.tolist(), anchor_weight=w0,
                                 anchor_bias=b0), TypeError, "anchor_preact"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(6))
def test_delta_form_bad_input_raises_before_any_write(backend, case):
    x, w, b, y, z0, w0, b0 = _anchored_layer((6, 5, 4), "tanh", True)
    what, kw, error, fragment = _bad_delta_form_calls(x, w, b, y, z0, w0, b0)[case]
    out = (torch.full_like(w, float("nan")), torch.full_like(b, float("nan")))
    with pytest.raises(error, match=fragment):
        lk.matched_loss_grad(x, w, b, y, "tanh", backend=backend, out=out, **kw)
    assert out[0].isnan().all() and out[1].isnan().all(), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_form_refuses_z0_overlapping_an_output(backend):
    x, w, b, y, z0, w0, b0 = _anchored_layer((5, 4, 5), "tanh", True)
    out_w = torch.full((5, 5), float("nan"), device=DEVICE)
    with pytest.raises(ValueError, match="overlap"):
        lk.matched_loss_grad(x, w[:, :4].contiguous(), b, y, "tanh", anchor_preact=out_w,
                             anchor_weight=w0, anchor_bias=b0, out=(out_w[:, :4], b.clone()),
                             backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_form_opcheck(backend):
    """The schema's trailing anchor_preact (default None) through opcheck: the functional
    op and the _out op, with and without it (older positional calls still bind)."""
    from locoprop_kernels import ops

    x, w, b, y, z0, w0, b0 = _anchored_layer((5, 4, 3), "softmax", True)
    args = (x, w, b, y, "softmax", 0.5, w0, b0, 0.3, backend, "ieee")
    torch.library.opcheck(ops._matched_loss_grad_op, (*args, z0))
    torch.library.opcheck(ops._matched_loss_grad_out_op,
                          (*args, torch.empty_like(w), torch.empty_like(b), z0))
    gw, gb = ops._matched_loss_grad_op(*args, z0)
    rw, rb = _delta_form_reference(x, w, b, y, "softmax", z0, w0, b0, 0.5, 0.3)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5
