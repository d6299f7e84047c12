"""Mixed precision in the matched-loss ops: bf16/fp16 x and target with fp32 parameters.

Under ``torch.autocast`` a layer's recorded input X and output Z are half precision while its
parameters stay fp32. The ops accept that (the ``ops`` module docstring has the dtype rule):
the weight sets the compute dtype, the math and the returned gradients are fp32, and the half
operands are converted to fp32 exactly. Every backend is checked, for every activation of the
table, bf16 and fp16 operands, odd and power-of-two shapes, bias and prox on and off, out= into
an arena slice, against two bounds derived here and evaluated element by element.

Notation: u = 2^-24 (fp32 unit roundoff), gamma(n) = n u / (1 - n u), |.| element-wise,
X (B, K) and Y the half operands, W, b the fp32 parameters, s the scale, L the Lipschitz
constant of f (sup |f'| over the reals, measured on a fine grid; softmax: a change e in a row
of Z moves each probability by at most max_j |e_j| / 2, since a row of its Jacobian
diag(p) - p p^T has absolute sum 2 p_i (1 - p_i) <= 1/2).

1. Against the float64 reference on the SAME values (the half X and Y cast to float64, W and b
   exactly): the casts are exact, so only the fp32 arithmetic differs. Standard dot-product
   error bounds, for any summation order (BLAS, tiles, split reductions):
     Z   = X W^T + b:  |dZ| <= eZ = gamma(K + 1) (|X| |W|^T + |b|)
     D   = f(Z) - Y:   |dD| <= eD = L eZ (softmax: max over the row of eZ / 2)
                                    + c u (|f(Z)| + |Z| + |Y|)    (evaluating f, the
                       subtraction and the scale; c = 16 covers the kernels' exp-based tanh,
                       sigmoid and softmax, ~2-4 ulp each, and one rounding per other step;
                       softmax adds (d_out + row range of Z) u |f(Z)| for its sum of d_out
                       exponentials and the rounding of z - max in their arguments)
     G_W = s D^T X:    |dG_W| <= |s| (gamma(B) (|D| + eD) + eD)^T |X| + u |G_W|
     G_b = s sum_n D:  the same with |X| replaced by ones
     prox + (W - W0) / eta:  + 3 u |W - W0| / eta + u |G|      (difference, multiply, add)
   The test asserts |got - want| <= that bound for every element (first order in u; the
   O(u^2) terms are below 1e-12 relative here). Normwise it is about 1e-5 of max|G| on these
   shapes, the tolerance the fp32 tests use. It is a worst case: the largest error measured
   (every backend, case and element) is 0.045 of it, while a half-precision step anywhere in
   the computation exceeds it: the weight rounded to fp16 gives at least 4.8x the bound, to
   bf16 far more, and a GEMM run in bf16 by autocast (before the ops turned autocast off
   inside) gave 75x.

2. Against the float64 result on the ORIGINAL fp32 values x, y (before rounding to half):
   rounding to the half format moves each element by at most u_h of itself, u_h = 2^-8
   (bf16) or 2^-11 (fp16; the values here stay in fp16's normal range). Then exactly
   (Lipschitz, no higher-order terms), with X~ = half(x), D~ its delta:
     |Z~ - Z| <= u_h |x| |W|^T,      |D~ - D| <= eR = L u_h |x| |W|^T (softmax: row max / 2)
                                                      + u_h |y|
     G~_W - G_W = s ((D~ - D)^T X~ + D^T (X~ - x)):  |.| <= |s| (eR^T |X~| + |D|^T u_h |x|)
     G~_b - G_b = s sum_n (D~ - D):                  |.| <= |s| sum_n eR
   and the prox term is unchanged. The test asserts |got - want_fp32| <= this bound plus
   bound 1, element by element. Normwise (max|.| / max|G|) it comes to about 6 u_h here
   (2.4% for bf16, 0.3% for fp16; the errors measured reach 0.24 of the bound): the accuracy
   a caller gives up by recording half operands, which no kernel can win back.

Conv2d layers: the same bounds with K = C_in/groups * kh * kw, B = N * H_out * W_out (the
positions), X W^T replaced by the convolution and D^T X by its weight gradient, checked
normwise (the maximum error against the maximum bound): torch's convolutions may use
algorithms (Winograd, FFT) whose errors are bounded normwise, not element by element.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import locoprop_kernels as lk
from locoprop_kernels import ops, reference
from locoprop_kernels.activations import ACTIVATIONS

from conftest import BACKENDS, DEVICE, f64, rel_err, random_layer

HALF = [torch.bfloat16, torch.float16]
#: Unit roundoff of each format: half the distance from 1 to the next value.
UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
#: Rounding errors of evaluating f, the subtraction and the scale, in units of u (docstring).
EVAL_ULPS = 16
ROW_WISE = {"softmax"}
# (B, d_in, d_out): odd sizes, powers of two, one size past a 64-wide tile. Small: each
# Triton launch under the interpreter is numpy in Python.
SHAPES = [(7, 33, 5), (16, 8, 32), (65, 16, 3)]


def gamma(n: int, u: float = UNIT[torch.float32]) -> float:
    return n * u / (1 - n * u)


_LIPSCHITZ = {}


def lipschitz(activation: str) -> float:
    """sup |f'| of an element-wise activation, measured in float64 on a grid of spacing 1e-4
    over [-40, 40] (f' is flat beyond), plus 1e-3 relative for the sup between grid points;
    softmax's row-wise constant (1/2 on the row's max change) is applied separately."""
    if activation not in _LIPSCHITZ:
        z = torch.linspace(-40.0, 40.0, 800_001, dtype=torch.float64, requires_grad=True)
        ACTIVATIONS[activation].f(z).sum().backward()
        _LIPSCHITZ[activation] = float(z.grad.abs().max()) * (1 + 1e-3)
    return _LIPSCHITZ[activation]


def _propagate(activation: str, e_z: torch.Tensor) -> torch.Tensor:
    """A bound on |f(Z + dZ) - f(Z)| from a bound e_z on |dZ|; rows are dim 1 (the features
    of a Linear layer, the channels of a Conv2d layer)."""
    if activation in ROW_WISE:
        return 0.5 * e_z.amax(dim=1, keepdim=True).expand_as(e_z)
    return lipschitz(activation) * e_z


class Linear:
    """The Linear layer's maps for the bounds: Z = X W^T (+ b), G = D^T X."""

    def __init__(self, x, w):
        self.K, self.R = w.shape[1], x.shape[0]

    @staticmethod
    def forward(x, w):
        return x @ w.T

    @staticmethod
    def weight_grad(x, d, w_shape):
        return d.T @ x

    @staticmethod
    def bias_view(b):
        return b[None, :]

    @staticmethod
    def bias_sum(d):
        return d.sum(0)


class Conv2d:
    """The same maps for a Conv2d layer with the given stride/padding/dilation/groups."""

    def __init__(self, x, w, **conv):
        self.conv = conv
        self.K = w[0].numel()
        self.R = None  # set from Z's shape

    def forward(self, x, w):
        z = F.conv2d(x, w, None, **self.conv)
        self.R = z.shape[0] * z.shape[2] * z.shape[3]
        return z

    def weight_grad(self, x, d, w_shape):
        c = self.conv
        return torch.nn.grad.conv2d_weight(x, w_shape, d, c.get("stride", 1),
                                           c.get("padding", 0), c.get("dilation", 1),
                                           c.get("groups", 1))

    @staticmethod
    def bias_view(b):
        return b[None, :, None, None]

    @staticmethod
    def bias_sum(d):
        return d.sum((0, 2, 3))


def _delta64(layer, x, w, b, y, activation):
    """Z and D = f(Z) - Y in float64 (f over dim 1)."""
    z = layer.forward(x, w) + (0 if b is None else layer.bias_view(b))
    fz = ACTIVATIONS[activation].f(z.movedim(1, -1)).movedim(-1, 1)
    return z, fz, fz - y


def fp32_bound(layer, x, w, b, y, activation, *, scale, eta=None, w0=None, b0=None):
    """Bound 1 of the module docstring, element-wise, for (grad_W, grad_b): what fp32
    arithmetic on these exact (float64) inputs may differ from the float64 result."""
    u = UNIT[torch.float32]
    x, w, y = f64(x), f64(w), f64(y)
    b = f64(b)
    z, fz, d = _delta64(layer, x, w, b, y, activation)
    abs_b = 0 if b is None else layer.bias_view(b.abs())
    e_z = gamma(layer.K + 1) * (layer.forward(x.abs(), w.abs()) + abs_b)
    e_eval = EVAL_ULPS * u * (fz.abs() + z.abs() + y.abs())
    if activation in ROW_WISE:
        n, row_range = z.shape[1], z.amax(1, keepdim=True) - z.amin(1, keepdim=True)
        e_eval = e_eval + (n + row_range) * u * fz.abs()
    e_d = _propagate(activation, e_z) + e_eval
    s = abs(scale)
    g_w = scale * layer.weight_grad(x, d, w.shape)
    bound_w = s * layer.weight_grad(x.abs(), gamma(layer.R) * (d.abs() + e_d) + e_d,
                                    w.shape) + u * g_w.abs()
    bound_b = g_b = None
    if b is not None:
        g_b = scale * layer.bias_sum(d)
        bound_b = s * layer.bias_sum(gamma(layer.R) * (d.abs() + e_d) + e_d) + u * g_b.abs()
    if eta is not None:
        prox_w = (w - f64(w0)) / eta
        bound_w = bound_w + 3 * u * prox_w.abs() + u * (g_w + prox_w).abs()
        if b is not None:
            prox_b = (b - f64(b0)) / eta
            bound_b = bound_b + 3 * u * prox_b.abs() + u * (g_b + prox_b).abs()
    return bound_w, bound_b


def rounding_bound(layer, x, x_half, w, b, y, activation, low, *, scale):
    """Bound 2 of the module docstring: what rounding x and y (fp32) to ``low`` may move the
    exact gradient by, element-wise, for (grad_W, grad_b)."""
    u_h = UNIT[low]
    x, x_half, w, y = f64(x), f64(x_half), f64(w), f64(y)
    b = f64(b)
    _, _, d = _delta64(layer, x, w, b, y, activation)
    e_r = _propagate(activation, u_h * layer.forward(x.abs(), w.abs())) + u_h * y.abs()
    s = abs(scale)
    bound_w = s * (layer.weight_grad(x_half.abs(), e_r, w.shape)
                   + layer.weight_grad(u_h * x.abs(), d.abs(), w.shape))
    bound_b = None if b is None else s * layer.bias_sum(e_r)
    return bound_w, bound_b


_layer = random_layer  # x, W, b, y, W0, b0 (conftest)


def _assert_within(got, want, bound, what):
    err = (f64(got) - want).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, (f"{what}: error exceeds the derived bound by {worst:.3e} "
                        f"(max error {err.max().item():.3e}, max bound {bound.max().item():.3e})")


def _prox_kw(prox, B, w0, b0):
    return dict(scale=1.0 / B if prox else 1.0, eta=0.5 if prox else None,
                anchor_weight=w0 if prox else None, anchor_bias=b0 if prox else None)


def _reference64(x, w, b, y, activation, kw):
    return reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), activation,
                                       scale=kw["scale"], eta=kw["eta"],
                                       anchor_weight=f64(kw["anchor_weight"]),
                                       anchor_bias=f64(kw["anchor_bias"]))


# ---------------------------------------------------------------- Linear

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", HALF, ids=str)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("prox", [False, True], ids=["noprox", "prox"])
def test_half_operands_fp32_parameters(backend, low, activation, shape, bias, prox):
    """Half x and target, fp32 weight/bias/anchors: fp32 results within bound 1 of the
    float64 reference on the same half values, and within bounds 1 + 2 of the float64 result
    on the fp32 values they were rounded from."""
    x, w, b, y, w0, b0 = _layer(*shape, activation, bias)
    x_h, y_h = x.to(low), y.to(low)
    kw = _prox_kw(prox, shape[0], w0, b0)
    gw, gb = lk.matched_loss_grad(x_h, w, b, y_h, activation, backend=backend, **kw)
    assert gw.dtype == torch.float32 and gw.shape == w.shape
    assert (gb is None) == (not bias)

    layer = Linear(x, w)
    rw, rb = _reference64(x_h, w, b, y_h, activation, kw)
    bw, bb = fp32_bound(layer, x_h, w, b, y_h, activation, scale=kw["scale"], eta=kw["eta"],
                        w0=w0, b0=b0)
    _assert_within(gw, rw, bw, "grad_W vs the same half values")
    ow, ob = _reference64(x, w, b, y, activation, kw)
    qw, qb = rounding_bound(layer, x, x_h, w, b, y, activation, low, scale=kw["scale"])
    _assert_within(gw, ow, bw + qw, "grad_W vs the fp32 values")
    if bias:
        assert gb.dtype == torch.float32
        _assert_within(gb, rb, bb, "grad_b vs the same half values")
        _assert_within(gb, ob, bb + qb, "grad_b vs the fp32 values")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", HALF, ids=str)
@pytest.mark.parametrize("activation", ["softmax", "tanh"])
def test_out_into_arena_slice(backend, low, activation):
    """out= into views of one fp32 arena: written within bound 1, nothing else touched."""
    x, w, b, y, w0, b0 = _layer(9, 17, 11, activation, True, seed=1)
    x_h, y_h = x.to(low), y.to(low)
    arena = lk.Arena([(3,), w.shape, b.shape, (2,)], device=DEVICE, fill=-7.0)
    _, gw_view, gb_view, _ = arena.views()
    kw = _prox_kw(True, 9, w0, b0)
    out = lk.matched_loss_grad(x_h, w, b, y_h, activation, out=(gw_view, gb_view),
                               backend=backend, **kw)
    assert out[0] is gw_view and out[1] is gb_view
    rw, rb = _reference64(x_h, w, b, y_h, activation, kw)
    bw, bb = fp32_bound(Linear(x, w), x_h, w, b, y_h, activation, scale=kw["scale"],
                        eta=kw["eta"], w0=w0, b0=b0)
    _assert_within(gw_view, rw, bw, "grad_W in the arena")
    _assert_within(gb_view, rb, bb, "grad_b in the arena")
    assert (arena[0] == -7).all() and (arena[3] == -7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_x_fp16_target(backend):
    """x and target each follow the rule on their own: bf16 x with an fp16 target."""
    x, w, b, y, _, _ = _layer(7, 33, 5, "sigmoid", True, seed=2)
    x_h, y_h = x.to(torch.bfloat16), y.to(torch.float16)
    gw, gb = lk.matched_loss_grad(x_h, w, b, y_h, "sigmoid", backend=backend)
    rw, rb = _reference64(x_h, w, b, y_h, "sigmoid", _prox_kw(False, 7, None, None))
    bw, bb = fp32_bound(Linear(x, w), x_h, w, b, y_h, "sigmoid", scale=1.0)
    _assert_within(gw, rw, bw, "grad_W")
    _assert_within(gb, rb, bb, "grad_b")


@pytest.mark.parametrize("low", HALF, ids=str)
def test_fp64_weight_on_the_reference(low):
    """Half operands with an fp64 weight: auto-selects the reference backend, fp64 math and
    results (the half values are exact in fp64: only fp64 rounding remains)."""
    x, w, b, y, _, _ = _layer(7, 33, 5, "tanh", True, seed=3)
    x_h, y_h = x.to(low), y.to(low)
    w, b = w.double(), b.double()
    gw, gb = lk.matched_loss_grad(x_h, w, b, y_h, "tanh")
    assert gw.dtype == gb.dtype == torch.float64
    rw, rb = reference.matched_loss_grad(f64(x_h), w, b, f64(y_h), "tanh")
    assert rel_err(gw, rw) <= 1e-12 and rel_err(gb, rb) <= 1e-12


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fp64_weight_refused_by_the_compiled_backends(backend):
    """cpp and triton compute in fp32 at most: an fp64 weight is refused before any work,
    naming the weight and the backend (x, a half operand, is fine)."""
    x, w, b, y, _, _ = _layer(7, 5, 3, "tanh", True)
    with pytest.raises(TypeError, match=rf"locoprop.matched_loss_grad: argument 'weight' "
                                        rf"expected a dtype the '{backend}' backend"):
        lk.matched_loss_grad(x.bfloat16(), w.double(), b.double(), y.bfloat16(), "tanh",
                             backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", HALF, ids=str)
def test_all_half_unchanged(backend, low):
    """A model cast to half (x, weight, bias, target all one half dtype) keeps half storage
    and half outputs, fp32 math: the rule changes nothing there."""
    x, w, b, y, _, _ = _layer(19, 24, 13, "tanh", True)
    x, w, b, y = (t.to(low) for t in (x, w, b, y))
    gw, gb = lk.matched_loss_grad(x, w, b, y, "tanh", backend=backend)
    assert gw.dtype == gb.dtype == low
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(y), "tanh")
    # One rounding of the fp32 result to the half format: one ulp of the largest element.
    tol = 2 * UNIT[low]
    assert rel_err(gw, rw) <= tol and rel_err(gb, rb) <= tol


# ---------------------------------------------------------------- Conv2d

CONV_SHAPES = {
    # (N, C_in, H, W, C_out, kernel, conv options)
    "odd-s2p1": (2, 3, 7, 5, 5, (3, 3), dict(stride=2, padding=1)),
    "pow2-groups": (2, 4, 8, 8, 8, (3, 3), dict(padding=1, groups=2)),
}


def _conv_layer(N, C_in, H, W, C_out, kernel, conv, activation, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = conv.get("groups", 1)
    x = torch.randn(N, C_in, H, W, generator=g)
    w = torch.randn(C_out, C_in // groups, *kernel, generator=g) / math.sqrt(
        C_in // groups * kernel[0] * kernel[1])
    b = torch.randn(C_out, generator=g)
    z = F.conv2d(x, w, b, **conv)
    y = ACTIVATIONS[activation].f(torch.randn(z.shape, generator=g).movedim(1, -1)).movedim(-1, 1)
    w0 = w + 0.1 * torch.randn(w.shape, generator=g)
    b0 = b + 0.1 * torch.randn(b.shape, generator=g)
    return tuple(t.to(DEVICE) for t in (x, w, b, y, w0, b0))


def _assert_within_normwise(got, want, bound, what):
    err = (f64(got) - want).abs().max().item()
    assert err <= bound.max().item(), f"{what}: max error {err:.3e} > max bound {bound.max():.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", HALF, ids=str)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", list(CONV_SHAPES))
def test_conv2d_half_operands_fp32_parameters(backend, low, activation, shape):
    """The Conv2d op with half x and target, fp32 parameters, prox on, out= into an fp32
    arena slice: within bound 1 (normwise) of the float64 reference on the same half values,
    and within bounds 1 + 2 of the float64 result on the fp32 values."""
    N, C_in, H, W, C_out, kernel, conv = CONV_SHAPES[shape]
    x, w, b, y, w0, b0 = _conv_layer(N, C_in, H, W, C_out, kernel, conv, activation)
    x_h, y_h = x.to(low), y.to(low)
    kw = dict(scale=0.5, eta=0.25, anchor_weight=w0, anchor_bias=b0)
    arena = lk.Arena([(3,), w.shape, b.shape, (2,)], device=DEVICE, fill=-7.0)
    _, gw, gb = arena.views()[:3]
    lk.matched_loss_grad_conv2d(x_h, w, b, y_h, activation, backend=backend, out=(gw, gb),
                                **conv, **kw)
    assert (arena[0] == -7).all() and (arena[3] == -7).all()
    gw2, gb2 = lk.matched_loss_grad_conv2d(x_h, w, b, y_h, activation, backend=backend,
                                           **conv, **kw)
    assert gw2.dtype == gb2.dtype == torch.float32
    assert torch.equal(gw2, gw) and torch.equal(gb2, gb)

    def ref(x, y):
        return reference.matched_loss_grad_conv2d(f64(x), f64(w), f64(b), f64(y), activation,
                                                  **conv, scale=0.5, eta=0.25,
                                                  anchor_weight=f64(w0), anchor_bias=f64(b0))

    layer = Conv2d(x, w, **conv)
    bw, bb = fp32_bound(layer, x_h, w, b, y_h, activation, scale=0.5, eta=0.25, w0=w0, b0=b0)
    rw, rb = ref(x_h, y_h)
    _assert_within_normwise(gw, rw, bw, "grad_W vs the same half values")
    _assert_within_normwise(gb, rb, bb, "grad_b vs the same half values")
    qw, qb = rounding_bound(layer, x, x_h, w, b, y, activation, low, scale=0.5)
    ow, ob = ref(x, y)
    _assert_within_normwise(gw, ow, bw + qw, "grad_W vs the fp32 values")
    _assert_within_normwise(gb, ob, bb + qb, "grad_b vs the fp32 values")


# ---------------------------------------------------------------- torch.autocast

@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_recorded_under_autocast(backend):
    """What autocast records for the second Linear of Linear-Tanh-Linear (bf16 X and Z, fp32
    parameters) goes straight into the op, also while autocast is still on (custom ops are
    not autocast: nothing is cast, the result is fp32)."""
    if DEVICE == "cuda":
        device_type, dtype = "cuda", torch.float16
    else:
        device_type, dtype = "cpu", torch.bfloat16
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                                torch.nn.Linear(9, 4)).to(DEVICE)
    recorded = {}
    model[2].register_forward_hook(lambda m, args, out: recorded.update(x=args[0], z=out))
    with torch.autocast(device_type, dtype=dtype):
        model(torch.randn(5, 6, device=DEVICE))
        x, z = recorded["x"].detach(), recorded["z"].detach()
        assert x.dtype == z.dtype == dtype
        w, b = model[2].weight.detach(), model[2].bias.detach()
        target = torch.sigmoid(z)
        gw, gb = lk.matched_loss_grad(x, w, b, target, "sigmoid", backend=backend)
    assert gw.dtype == gb.dtype == torch.float32
    rw, rb = reference.matched_loss_grad(f64(x), f64(w), f64(b), f64(target), "sigmoid")
    bw, bb = fp32_bound(Linear(x, w), x, w, b, target, "sigmoid", scale=1.0)
    _assert_within(gw, rw, bw, "grad_W")
    _assert_within(gb, rb, bb, "grad_b")


# ---------------------------------------------------------------- torch.library

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", HALF, ids=str)
def test_opcheck_mixed(backend, low):
    """opcheck (schema, fake tensors, AOT dispatch) on mixed-dtype calls of all four ops."""
    x, w, b, y, w0, b0 = _layer(5, 4, 3, "softmax", True)
    x, y = x.to(low), y.to(low)
    torch.library.opcheck(ops._matched_loss_grad_op,
                          (x, w, b, y, "softmax", 0.5, w0, b0, 0.3, backend, "ieee"))
    torch.library.opcheck(ops._matched_loss_grad_out_op,
                          (x, w, b, y, "tanh", 1.0, None, None, None, backend, "ieee",
                           torch.empty_like(w), torch.empty_like(b)))
    N, C_in, H, W, C_out, kernel, conv = CONV_SHAPES["odd-s2p1"]
    xc, wc, bc, yc, wc0, bc0 = _conv_layer(N, C_in, H, W, C_out, kernel, conv, "tanh")
    xc, yc = xc.to(low), yc.to(low)
    conv_args = ([2, 2], [1, 1], [1, 1], 1)
    torch.library.opcheck(ops._matched_loss_grad_conv2d_op,
                          (xc, wc, bc, yc, "tanh", *conv_args, 0.5, wc0, bc0, 0.3, backend,
                           "ieee"))
    torch.library.opcheck(ops._matched_loss_grad_conv2d_out_op,
                          (xc, wc, None, yc, "relu", *conv_args, 1.0, None, None, None,
                           backend, "ieee", torch.empty_like(wc), None))


def test_fake_gives_the_real_dtypes():
    """register_fake accepts the mixed calls and describes fp32 outputs, as the real op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b, y, _, _ = _layer(5, 4, 3, "tanh", True)
    x, y = x.bfloat16(), y.half()
    real = ops._matched_loss_grad_op(x, w, b, y, "tanh", 1.0, None, None, None, "reference",
                                     "ieee")
    with FakeTensorMode() as mode:
        fx, fw, fb, fy = (mode.from_tensor(t) for t in (x, w, b, y))
        fake = ops._matched_loss_grad_op(fx, fw, fb, fy, "tanh", 1.0, None, None, None,
                                         "reference", "ieee")
    assert [(t.dtype, t.shape) for t in fake] == [(t.dtype, t.shape) for t in real]
    assert all(t.dtype == torch.float32 for t in real)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_mixed(backend):
    """One compiled function over a mixed call: no graph break, eager's numbers bit for bit."""
    x, w, b, y, _, _ = _layer(6, 5, 4, "tanh", True)
    x, y = x.bfloat16(), y.bfloat16()

    def grads(x, w, b, y):
        return lk.matched_loss_grad(x, w, b, y, "tanh", scale=0.5, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(grads, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, w, b, y), grads(x, w, b, y)
    for g, e in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, e)


# ---------------------------------------------------------------- local_targets

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", HALF, ids=str)
def test_local_targets_half_in_half_out(backend, low):
    """local_targets keeps one dtype: half preact and grad_preact give half targets (fp32
    math, rounded once: within one ulp of the largest element), which the matched-loss ops
    then take as a half target."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(9, 13, generator=g).to(DEVICE, low)
    grad = (torch.randn(9, 13, generator=g) / 9).to(DEVICE, low)
    y = lk.local_targets(z, grad, "tanh", 10.0, backend=backend)
    assert y.dtype == low
    assert rel_err(y, reference.local_targets(f64(z), f64(grad), "tanh", 10.0)) <= 2 * UNIT[low]
