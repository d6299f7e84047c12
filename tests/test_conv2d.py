"""matched_loss_grad_conv2d: the reference's identities in float64, every backend against it,
the docs/design.md invariant (first local gradient = gamma x backprop) for a Conv2d, bad input,
torch.library integration."""
import pytest
import torch
import torch.nn.functional as F

import locoprop_kernels as lk
from locoprop_kernels import ops, reference
from locoprop_kernels.activations import ACTIVATIONS
from locoprop_kernels.ops.matched_loss import repeatable_matched_loss_grad

from conftest import BACKENDS, DEVICE, f64, rel_err

ACTS = list(ACTIVATIONS)

# (N, C_in, H, W, C_out, (kh, kw), conv options): odd sizes, powers of two, a C_out past one
# 64-wide tile (softmax over several column tiles), grouped and depthwise. Kept small: the
# triton backend runs under the interpreter.
SHAPES = {
    "1x1": (1, 1, 1, 1, 1, (1, 1), {}),
    "odd": (2, 3, 7, 5, 5, (3, 3), {}),
    "pow2-s2p1": (2, 4, 8, 8, 16, (3, 3), dict(stride=2, padding=1)),
    "odd-s2p1d2": (3, 5, 9, 11, 7, (3, 2), dict(stride=2, padding=1, dilation=2)),
    "grouped": (2, 6, 6, 7, 9, (3, 3), dict(stride=(2, 1), padding=(1, 0), groups=3)),
    "depthwise": (2, 8, 8, 8, 8, (3, 3), dict(padding=1, groups=8)),
    "c65": (1, 3, 5, 4, 65, (3, 3), dict(padding=1)),
}
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _layer(N, C_in, H, W, C_out, kernel, conv, activation, bias, dtype=torch.float32, seed=0):
    """x, w, b, y, w0, b0 of one Conv2d layer (y in f's range, as a target is)."""
    g = torch.Generator().manual_seed(seed)
    groups = conv.get("groups", 1)
    x = torch.randn(N, C_in, H, W, generator=g)
    fan_in = C_in // groups * kernel[0] * kernel[1]
    w = torch.randn(C_out, C_in // groups, *kernel, generator=g) / fan_in ** 0.5
    b = torch.randn(C_out, generator=g) if bias else None
    z_shape = F.conv2d(x, w, None, **conv).shape
    y = reference._over_channels(ACTIVATIONS[activation].f, torch.randn(z_shape, generator=g))
    w0 = w + 0.1 * torch.randn(w.shape, generator=g)
    b0 = b + 0.1 * torch.randn(C_out, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(x), to(w), to(b), to(y), to(w0), to(b0)


def _reference(x, w, b, y, activation, conv, **kw):
    return reference.matched_loss_grad_conv2d(
        f64(x), f64(w), f64(b), f64(y), activation, **conv, scale=kw.get("scale", 1.0),
        eta=kw.get("eta"), anchor_weight=f64(kw.get("anchor_weight")),
        anchor_bias=f64(kw.get("anchor_bias")))


# ---------------------------------------------------------------- the reference (float64)

@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("eta", [None, 0.7], ids=["noprox", "prox"])
@pytest.mark.parametrize("shape", ["odd-s2p1d2", "grouped"])
def test_reference_is_autograd_of_local_objective(activation, bias, eta, shape):
    """grad = d/d(W, b) of scale * sum_positions [F(z) - y.z] (+ prox), F from the table."""
    N, C_in, H, W, C_out, kernel, conv = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C_in, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C_out, C_in // conv.get("groups", 1), *kernel, generator=g,
                    dtype=torch.float64).requires_grad_()
    b = torch.randn(C_out, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    y = torch.rand(F.conv2d(x, w, None, **conv).shape, generator=g, dtype=torch.float64)
    w0 = w.detach() + 0.3
    b0 = b.detach() - 0.2 if bias else None
    kw = dict(**conv, scale=0.37, anchor_weight=w0, anchor_bias=b0, eta=eta)
    obj = reference.local_objective_conv2d(x, w, b, y, activation, **kw)
    auto = torch.autograd.grad(obj, [w] + ([b] if bias else []))
    gw, gb = reference.matched_loss_grad_conv2d(x, w.detach(), f64(b), y, activation, **kw)
    assert rel_err(gw, auto[0]) <= 1e-10
    if bias:
        assert rel_err(gb, auto[1]) <= 1e-10
    else:
        assert gb is None


@pytest.mark.parametrize("activation", ACTS)
def test_reference_equals_linear_on_positions(activation):
    """A Conv2d's matched loss is the Linear one on unfolded patches (im2col rows)."""
    N, C_in, H, W, C_out, kernel, conv = SHAPES["odd-s2p1d2"]
    x, w, b, y, _, _ = (f64(t) for t in _layer(N, C_in, H, W, C_out, kernel, conv, activation,
                                                True))
    patches = F.unfold(x, kernel, conv["dilation"], conv["padding"], conv["stride"])
    x_rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    y_rows = y.permute(0, 2, 3, 1).reshape(-1, C_out)
    lw, lb = reference.matched_loss_grad(x_rows, w.reshape(C_out, -1), b, y_rows, activation)
    gw, gb = reference.matched_loss_grad_conv2d(x, w, b, y, activation, **conv)
    assert rel_err(gw.reshape(C_out, -1), lw) <= 1e-12 and rel_err(gb, lb) <= 1e-12


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("variant", ["M", "S"])
def test_first_local_gradient_is_gamma_times_backprop(activation, variant):
    """docs/design.md section 2's invariant for a Conv2d with stride 2, padding 1, dilation 2 and a
    bias, float64: with Y = f(Z0) - gamma G (G = dL/dZ), the local gradient at W0 is
    gamma x the backprop gradient of W and b (f over the channels; variant S: identity)."""
    gamma = 10.0
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2).double()
    head = torch.nn.Conv2d(6, 3, 2).double()
    x = torch.randn(5, 4, 11, 9, generator=g, dtype=torch.float64)
    z = conv(x)
    z.retain_grad()
    logits = head(reference._over_channels(ACTIVATIONS[activation].f, z))
    loss = F.binary_cross_entropy_with_logits(
        logits, torch.rand(logits.shape, generator=g, dtype=torch.float64),
        reduction="sum") / x.shape[0]
    loss.backward()
    y = reference.local_targets_conv2d(z.detach(), z.grad, activation, gamma, variant=variant)
    local_act = activation if variant == "M" else "identity"
    kw = dict(stride=2, padding=1, dilation=2)
    gw, gb = reference.matched_loss_grad_conv2d(x, conv.weight.detach(), conv.bias.detach(), y,
                                                local_act, **kw)
    assert rel_err(gw, gamma * conv.weight.grad) <= 1e-10
    assert rel_err(gb, gamma * conv.bias.grad) <= 1e-10
    # The op on the reference backend (the one that serves float64) gives the same.
    ow, ob = lk.matched_loss_grad_conv2d(x, conv.weight.detach(), conv.bias.detach(), y,
                                         local_act, backend="reference", **kw)
    assert rel_err(ow, gamma * conv.weight.grad) <= 1e-10
    assert rel_err(ob, gamma * conv.bias.grad) <= 1e-10


# ---------------------------------------------------------------- every backend (fp32)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", ["1x1", "odd", "pow2-s2p1", "odd-s2p1d2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_matches_reference(backend, activation, shape, bias, prox):
    N, C_in, H, W, C_out, kernel, conv = SHAPES[shape]
    x, w, b, y, w0, b0 = _layer(N, C_in, H, W, C_out, kernel, conv, activation, bias)
    kw = dict(scale=1.0 / N if prox else 1.0, eta=0.5 if prox else None,
              anchor_weight=w0 if prox else None, anchor_bias=b0 if prox else None)
    gw, gb = lk.matched_loss_grad_conv2d(x, w, b, y, activation, backend=backend, **conv, **kw)
    rw, rb = _reference(x, w, b, y, activation, conv, **kw)
    assert gw.dtype == w.dtype and gw.shape == w.shape and gw.is_contiguous()
    assert rel_err(gw, rw) <= 1e-5
    if bias:
        assert rel_err(gb, rb) <= 1e-5
    else:
        assert gb is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "tanh"])
@pytest.mark.parametrize("shape", ["grouped", "depthwise", "c65"])
def test_grouped_depthwise_and_wide(backend, activation, shape):
    N, C_in, H, W, C_out, kernel, conv = SHAPES[shape]
    x, w, b, y, w0, b0 = _layer(N, C_in, H, W, C_out, kernel, conv, activation, True)
    kw = dict(scale=0.5, eta=0.25, anchor_weight=w0, anchor_bias=b0)
    gw, gb = lk.matched_loss_grad_conv2d(x, w, b, y, activation, backend=backend, **conv, **kw)
    rw, rb = _reference(x, w, b, y, activation, conv, **kw)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_huge_logits_stay_finite(backend):
    """Channel logits of magnitude 1e4: each position's max is subtracted, nothing overflows."""
    N, C_in, H, W, C_out, kernel, conv = SHAPES["c65"]
    x, w, b, y, _, _ = _layer(N, C_in, H, W, C_out, kernel, conv, "softmax", True)
    w, b = w * 3e3, b * 1e4
    assert F.conv2d(x, w, b, **conv).abs().max() > 5e3
    gw, gb = lk.matched_loss_grad_conv2d(x, w, b, y, "softmax", backend=backend, **conv)
    rw, rb = _reference(x, w, b, y, "softmax", conv)
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_storage_fp32_math(backend, dtype):
    N, C_in, H, W, C_out, kernel, conv = SHAPES["odd-s2p1d2"]
    x, w, b, y, _, _ = _layer(N, C_in, H, W, C_out, kernel, conv, "sigmoid", True, dtype=dtype)
    gw, gb = lk.matched_loss_grad_conv2d(x, w, b, y, "sigmoid", backend=backend, **conv)
    rw, rb = _reference(x, w, b, y, "sigmoid", conv)
    assert gw.dtype == dtype and gb.dtype == dtype
    assert rel_err(gw, rw) <= TOL[dtype] and rel_err(gb, rb) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_out_into_arena_views(backend):
    """channels_last and strided inputs; out= into views of one flat buffer (nothing else
    touched) and into a non-contiguous output."""
    N, C_in, H, W, C_out, kernel, conv = SHAPES["pow2-s2p1"]
    x, w, b, y, _, _ = _layer(N, C_in, H, W, C_out, kernel, conv, "softmax", True)
    rw, rb = _reference(x, w, b, y, "softmax", conv)
    cl = torch.channels_last
    arena = lk.Arena([(3,), w.shape, b.shape, (2,)], device=DEVICE, fill=-7.0)
    _, gw_view, gb_view, _ = arena.views()
    out = lk.matched_loss_grad_conv2d(x.contiguous(memory_format=cl), w, b,
                                      y.contiguous(memory_format=cl), "softmax",
                                      out=(gw_view, gb_view), backend=backend, **conv)
    assert out[0] is gw_view and out[1] is gb_view
    assert rel_err(gw_view, rw) <= 1e-5 and rel_err(gb_view, rb) <= 1e-5
    assert (arena[0] == -7).all() and (arena[3] == -7).all()
    out_w = torch.empty(w.shape, device=DEVICE).contiguous(memory_format=cl)
    y_strided = torch.empty(*y.shape[:3], 2 * y.shape[3], device=DEVICE)[..., ::2]
    y_strided.copy_(y)
    lk.matched_loss_grad_conv2d(x.transpose(2, 3).contiguous().transpose(2, 3),
                                w.contiguous(memory_format=cl), b, y_strided, "softmax",
                                out=(out_w, torch.empty_like(b)), backend=backend, **conv)
    assert rel_err(out_w, rw) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_two_launches_per_call(backend):
    N, C_in, H, W, C_out, kernel, conv = SHAPES["odd"]
    x, w, b, y, _, _ = _layer(N, C_in, H, W, C_out, kernel, conv, "softmax", True)
    with lk.testing.count_launches() as n:
        lk.matched_loss_grad_conv2d(x, w, b, y, "softmax", backend=backend, **conv)
    assert getattr(n, backend) == 2


# ---------------------------------------------------------------- the delta form (anchor_preact)

def _delta_form_reference(x, w, b, y, activation, conv, z0, w0, b0, scale=1.0, eta=None):
    """float64: Z = Z0 + conv2d(X, W - W0) + (b - b0), D = f(Z) - Y (f over the channels),
    the gradients as ``reference.matched_loss_grad_conv2d`` (the prox term with eta only)."""
    x, w, b, y, z0, w0, b0 = map(f64, (x, w, b, y, z0, w0, b0))
    z = z0 + F.conv2d(x, w - w0, None if b is None else b - b0, **conv)
    d = reference._over_channels(ACTIVATIONS[activation].f, z) - y
    gw = scale * torch.nn.grad.conv2d_weight(x, w.shape, d, conv.get("stride", 1),
                                             conv.get("padding", 0), conv.get("dilation", 1),
                                             conv.get("groups", 1))
    gb = None if b is None else scale * d.sum((0, 2, 3))
    if eta is not None:
        gw = gw + (w - w0) / eta
        gb = None if b is None else gb + (b - b0) / eta
    return gw, gb


def _anchored_layer(shape, activation, bias, seed=0):
    """A Conv2d layer, its W0, b0 and a Z0 that is NOT conv2d(X, W0) + b0 (off by O(1)): the
    op's result then depends on which Z it forms, so a backend that ignored Z0 (or W0, b0)
    would fail."""
    N, C_in, H, W, C_out, kernel, conv = SHAPES[shape]
    x, w, b, y, w0, b0 = _layer(N, C_in, H, W, C_out, kernel, conv, activation, bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    z0 = F.conv2d(x, w0, b0, **conv)
    z0 = z0 + 0.3 * torch.randn(z0.shape, generator=g).to(DEVICE)
    return x, w, b, y, z0, w0, b0, conv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", ["odd", "odd-s2p1d2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_delta_form_matches_reference(backend, activation, shape, bias, prox):
    """anchor_preact Z0: Z = Z0 + conv2d(X, W - W0) + (b - b0) on every backend, every
    activation (softmax over the channels), stride/padding/dilation, bias and prox on/off."""
    x, w, b, y, z0, w0, b0, conv = _anchored_layer(shape, activation, bias)
    scale, eta = (1.0 / x.shape[0], 0.5) if prox else (1.0, None)
    kw = dict(scale=scale, eta=eta, anchor_weight=w0, anchor_bias=b0, backend=backend, **conv)
    gw, gb = lk.matched_loss_grad_conv2d(x, w, b, y, activation, anchor_preact=z0, **kw)
    rw, rb = _delta_form_reference(x, w, b, y, activation, conv, z0, w0, b0, scale, eta)
    assert gw.dtype == w.dtype and gw.shape == w.shape
    assert rel_err(gw, rw) <= 1e-5
    assert gb is None if not bias else rel_err(gb, rb) <= 1e-5
    # Not the plain form's result: Z0 was given away from conv2d(X, W0) + b0 on purpose.
    plain, _ = lk.matched_loss_grad_conv2d(x, w, b, y, activation, **kw)
    assert rel_err(plain, rw) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "tanh"])
@pytest.mark.parametrize("shape", ["1x1", "pow2-s2p1", "grouped", "depthwise", "c65"])
def test_delta_form_grouped_depthwise_and_wide(backend, activation, shape):
    x, w, b, y, z0, w0, b0, conv = _anchored_layer(shape, activation, True, seed=4)
    gw, gb = lk.matched_loss_grad_conv2d(x, w, b, y, activation, anchor_weight=w0,
                                         anchor_bias=b0, anchor_preact=z0, backend=backend,
                                         **conv)
    rw, rb = _delta_form_reference(x, w, b, y, activation, conv, z0, w0, b0)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_form_is_the_plain_form_at_the_recorded_z0(backend):
    """With Z0 = conv2d(X, W0) + b0 the delta form is the same function as the plain one."""
    x, w, b, y, _, w0, b0, conv = _anchored_layer("odd-s2p1d2", "tanh", True, seed=2)
    z0 = F.conv2d(f64(x), f64(w0), f64(b0), **conv).float()
    gw, gb = lk.matched_loss_grad_conv2d(x, w, b, y, "tanh", anchor_weight=w0, anchor_bias=b0,
                                         anchor_preact=z0, backend=backend, **conv)
    rw, rb = _reference(x, w, b, y, "tanh", conv)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("z0_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_delta_form_z0_dtypes_and_layouts(backend, z0_dtype, layout):
    """Z0 follows target's dtype rule (a half Z0 under an fp32 weight is upcast exactly) and
    may lie in either memory format; out= into arena views."""
    x, w, b, y, z0, w0, b0, conv = _anchored_layer("pow2-s2p1", "sigmoid", True, seed=3)
    z0 = z0.to(z0_dtype)
    if layout == "channels_last":
        z0 = z0.contiguous(memory_format=torch.channels_last)
    arena = lk.Arena([(3,), w.shape, b.shape], device=DEVICE, fill=-7.0)
    _, gw, gb = arena.views()
    lk.matched_loss_grad_conv2d(x, w, b, y, "sigmoid", anchor_weight=w0, anchor_bias=b0,
                                anchor_preact=z0, backend=backend, out=(gw, gb), **conv)
    rw, rb = _delta_form_reference(x, w, b, y, "sigmoid", conv, z0, w0, b0)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5
    assert (arena[0] == -7).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_delta_form_two_launches_per_call(backend):
    x, w, b, y, z0, w0, b0, conv = _anchored_layer("odd", "softmax", True)
    with lk.testing.count_launches() as n:
        lk.matched_loss_grad_conv2d(x, w, b, y, "softmax", anchor_weight=w0, anchor_bias=b0,
                                    anchor_preact=z0, backend=backend, **conv)
    assert getattr(n, backend) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_form_repeated(backend):
    """``repeatable_matched_loss_grad(conv2d=...)`` with Z0: ``again()`` after W and b move
    in place (W0, b0 and Z0 fixed, as in LocoProp's inner loop) gives the delta form at the
    new weights."""
    x, w, b, y, z0, w0, b0, conv = _anchored_layer("odd-s2p1d2", "tanh", True, seed=5)
    gw, gb, again = repeatable_matched_loss_grad(
        x, w, b, y, "tanh", conv2d=conv, scale=0.5, backend=backend, anchor_preact=z0,
        anchor_weight=w0, anchor_bias=b0)
    rw, rb = _delta_form_reference(x, w, b, y, "tanh", conv, z0, w0, b0, scale=0.5)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5
    w.mul_(0.9)
    b.add_(0.1)
    again()
    rw, rb = _delta_form_reference(x, w, b, y, "tanh", conv, z0, w0, b0, scale=0.5)
    assert rel_err(gw, rw) <= 1e-5 and rel_err(gb, rb) <= 1e-5


def _bad_delta_form_calls(x, w, b, y, z0, w0, b0):
    """(what is wrong, keywords, error type, argument the message names)."""
    return [
        ("no anchor_weight", dict(anchor_preact=z0, anchor_bias=b0), ValueError,
         "anchor_weight"),
        ("no anchor_bias with a bias", dict(anchor_preact=z0, anchor_weight=w0), ValueError,
         "anchor_bias"),
        ("Z0 of the wrong shape", dict(anchor_preact=z0[:, :-1], anchor_weight=w0,
                                       anchor_bias=b0), ValueError, "anchor_preact"),
        ("Z0 with H and W swapped", dict(anchor_preact=z0.transpose(2, 3).contiguous(),
                                         anchor_weight=w0, anchor_bias=b0), ValueError,
         "anchor_preact"),
        ("Z0 of a wrong dtype", dict(anchor_preact=z0.double(), anchor_weight=w0,
                                     anchor_bias=b0), TypeError, "anchor_preact"),
        ("Z0 not a tensor", dict(anchor_preact=z0.tolist(), anchor_weight=w0,
                                 anchor_bias=b0), TypeError, "anchor_preact"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(6))
def test_delta_form_bad_input_raises_before_any_write(backend, case):
    x, w, b, y, z0, w0, b0, conv = _anchored_layer("odd", "tanh", True)
    # H_out != W_out, so that the swapped Z0 has another shape.
    assert z0.shape[2] != z0.shape[3]
    what, kw, error, arg = _bad_delta_form_calls(x, w, b, y, z0, w0, b0)[case]
    out = (torch.full_like(w, float("nan")), torch.full_like(b, float("nan")))
    with pytest.raises(error) as info:
        lk.matched_loss_grad_conv2d(x, w, b, y, "tanh", backend=backend, out=out, **conv, **kw)
    message = str(info.value)
    assert "locoprop.matched_loss_grad_conv2d" in message and f"'{arg}'" in message, what
    assert out[0].isnan().all() and out[1].isnan().all(), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_form_refuses_z0_overlapping_an_output(backend):
    x, w, b, y, z0, w0, b0, conv = _anchored_layer("odd", "tanh", True)
    # One buffer holding both Z0 and out_weight: the op would read what it writes.
    buffer = torch.full((z0.numel() + w.numel(),), float("nan"), device=DEVICE)
    z0_view = buffer[:z0.numel()].view(z0.shape)
    z0_view.copy_(z0)
    out_w = buffer[z0.numel() - 1:z0.numel() - 1 + w.numel()].view(w.shape)
    with pytest.raises(ValueError, match="overlap"):
        lk.matched_loss_grad_conv2d(x, w, b, y, "tanh", anchor_preact=z0_view,
                                    anchor_weight=w0, anchor_bias=b0,
                                    out=(out_w, torch.empty_like(b)), backend=backend, **conv)
    assert torch.equal(z0_view, z0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_delta_form_opcheck(backend, bias):
    """The schemas' trailing anchor_preact (default None) through opcheck: the functional op
    and the _out op (Z0 after the outputs), with it (older positional calls without it:
    test_opcheck)."""
    x, w, b, y, z0, w0, b0, _ = _anchored_layer("pow2-s2p1", "softmax", bias)
    conv = ([2, 2], [1, 1], [1, 1], 1)
    args = (x, w, b, y, "softmax", *conv, 0.5, w0, b0, 0.3, backend, "ieee")
    torch.library.opcheck(ops._matched_loss_grad_conv2d_op, (*args, z0))
    out_b = None if b is None else torch.empty_like(b)
    torch.library.opcheck(ops._matched_loss_grad_conv2d_out_op,
                          (*args, torch.empty_like(w), out_b, z0))
    gw, gb = ops._matched_loss_grad_conv2d_op(*args, z0)
    rw, rb = _delta_form_reference(x, w, b, y, "softmax", dict(stride=2, padding=1), z0, w0,
                                   b0, 0.5, 0.3)
    assert rel_err(gw, rw) <= 1e-5
    if bias:
        assert rel_err(gb, rb) <= 1e-5


# ---------------------------------------------------------------- bad input

def _args(**change):
    x, w, b, y, w0, b0 = _layer(2, 4, 6, 6, 5, (3, 3), dict(stride=2, padding=1), "tanh", True)
    args = dict(x=x, weight=w, bias=b, target=y)
    kw = dict(activation="tanh", stride=2, padding=1, eta=0.5, anchor_weight=w0,
              anchor_bias=b0, out=(torch.full_like(w, 3.0), torch.full_like(b, 3.0)))
    for key, value in change.items():
        value = value(args, kw) if callable(value) else value
        (args if key in args else kw)[key] = value
    return args, kw


BAD = [
    (dict(x=lambda a, k: a["x"][0]), ValueError, "x"),
    (dict(x=lambda a, k: a["x"][:0]), ValueError, "x"),
    # An fp64 x with an fp32 weight: the weight is less precise than x (it is named).
    (dict(x=lambda a, k: a["x"].double()), TypeError, "weight"),
    # bf16 x is fine with an fp32 weight (mixed precision), a bf16 bias is not.
    (dict(x=lambda a, k: a["x"].bfloat16(), bias=lambda a, k: a["bias"].bfloat16()), TypeError,
     "bias"),
    (dict(x=lambda a, k: a["x"][..., :1, :1], padding=0), ValueError, "x"),
    (dict(weight=lambda a, k: a["weight"][:, :3]), ValueError, "weight"),
    # fp32 x with an fp64 weight: x is neither the weight's dtype nor a half one.
    (dict(weight=lambda a, k: a["weight"].double()), TypeError, "x"),
    (dict(weight="w"), TypeError, "weight"),
    (dict(bias=lambda a, k: a["bias"][:4]), ValueError, "bias"),
    (dict(target=lambda a, k: a["target"][:, :, :2]), ValueError, "target"),
    (dict(target=lambda a, k: a["target"].double()), TypeError, "target"),
    (dict(target=lambda a, k: a["target"].int()), TypeError, "target"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=(1, 2, 3)), TypeError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding="same"), TypeError, "padding"),
    (dict(dilation=1.5), TypeError, "dilation"),
    (dict(groups=3), ValueError, "weight"),
    (dict(groups=0), ValueError, "groups"),
    (dict(activation="elu"), ValueError, "activation"),
    (dict(eta=0.0), ValueError, "eta"),
    (dict(anchor_weight=None), ValueError, "anchor_weight"),
    (dict(anchor_bias=lambda a, k: k["anchor_bias"][:2]), ValueError, "anchor_bias"),
    (dict(out=lambda a, k: (k["out"][0][:1], k["out"][1])), ValueError, "out_weight"),
    (dict(out=lambda a, k: (k["out"][0], None)), ValueError, "out_bias"),
    (dict(out=lambda a, k: (a["weight"], k["out"][1])), ValueError, "out_weight"),
    (dict(out=lambda a, k: (k["out"][0], a["bias"])), ValueError, "out_bias"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD, ids=[f"{c[2]}-{i}" for i, c in enumerate(BAD)])
def test_bad_input(backend, case):
    changes, error, arg = case
    args, kw = _args(**changes)
    kw.setdefault("backend", backend)
    tensors = [t for t in [*args.values(), *kw.values(), *(kw["out"] or ())]
               if isinstance(t, torch.Tensor)]
    snapshot = [(t, t.clone()) for t in tensors]
    with pytest.raises(error) as info:
        lk.matched_loss_grad_conv2d(**args, **kw)
    message = str(info.value)
    assert "locoprop.matched_loss_grad_conv2d" in message and f"'{arg}'" in message, message
    for t, before in snapshot:
        assert torch.equal(t, before), message


def test_not_differentiable():
    x, w, b, y, _, _ = _layer(1, 2, 4, 4, 3, (3, 3), {}, "relu", True)
    w = w.requires_grad_()
    gw, _ = lk.matched_loss_grad_conv2d(x, w, b, y, "relu")
    with pytest.raises(RuntimeError, match="matched_loss_grad_conv2d is not differentiable"):
        gw.sum().backward()


# ---------------------------------------------------------------- torch.library

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(backend, bias):
    x, w, b, y, w0, b0 = _layer(2, 4, 5, 6, 3, (3, 2), dict(stride=2, padding=1), "softmax",
                                bias)
    conv = ([2, 2], [1, 1], [1, 1], 1)
    torch.library.opcheck(ops._matched_loss_grad_conv2d_op,
                          (x, w, b, y, "softmax", *conv, 0.5, w0, b0, 0.3, backend, "ieee"))
    out_w = torch.empty_like(w)
    out_b = None if b is None else torch.empty_like(b)
    torch.library.opcheck(ops._matched_loss_grad_conv2d_out_op,
                          (x, w, b, y, "tanh", *conv, 1.0, None, None, None, backend, "ieee",
                           out_w, out_b))


def test_compile_fullgraph():
    """One compiled function calling the op: no graph break, eager's numbers."""
    x, w, b, y, _, _ = _layer(2, 3, 6, 6, 4, (3, 3), dict(padding=1), "tanh", True)

    def grads(x, w, b, y):
        return lk.matched_loss_grad_conv2d(x, w, b, y, "tanh", padding=1, scale=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(grads, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w, b, y), grads(x, w, b, y)):
        assert torch.equal(got, want)
