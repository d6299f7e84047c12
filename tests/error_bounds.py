"""Element-wise rounding-error bounds for the matched-loss gradients, Linear and Conv2d.

A normwise tolerance (``max|got - want| <= tol * max|want|``) is right for a gradient whose
entries are of one scale, and wrong for an entry left small by cancellation: a sum of terms of
size 1 that comes to 1e-3 carries the rounding errors of its terms (~1e-7 each), 1e-4 of
itself. This module bounds each entry by what fp32 (or fp64) arithmetic may do to it, from the
magnitudes of the terms it is summed from, whatever the summation order (BLAS blocking, tiles,
split reductions, atomics-free tree sums all fall under it).

Notation: u the unit roundoff of the compute dtype (2^-24 fp32, 2^-53 fp64), gamma(n) =
n u / (1 - n u), |.| element-wise, s the scale, R the rows summed over (B for a Linear layer,
N * H_out * W_out positions for a Conv2d one), K the terms of one pre-activation
(d_in; C_in/groups * kh * kw for a Conv2d), tiny twice the smallest normal number of the
dtype (``flush_floor``).
The inputs are the values the op saw (already rounded to their dtype), so the float64
reference on them is exact to ~1e-16 and only the op's own arithmetic is bounded.

The classical bound for a computed sum of n terms t_i (any order; Higham, "Accuracy and
Stability of Numerical Algorithms", section 3.1) is |fl(sum t_i) - sum t_i| <= gamma(n-1)
sum |t_i|; with each term itself a rounded product (one more u) it is gamma(n) sum |t_i|.
Applied stage by stage, to first order in u:

  Z = X W^T + b          |dZ| <= eZ = gamma(K + 1) (|X| |W|^T + |b|)
                         (entries where Z is +-inf in float64 come from an infinite term,
                         which the fp32 sum has too: eZ = 0 there)
  f(Z)                   |f(Z + dZ) - f(Z)| <= L eZ, L = sup |f'| over [Z - eZ, Z + eZ]
                         (mean value theorem). L from |f'| measured in float64 on a grid of
                         1e-4 over [-40, 40] (f' is flat beyond), plus 1e-3 for the sup between
                         grid points: the sup over the interval's side of 0, from its end
                         nearest 0 outwards (tails are monotone), or over the reals when the
                         interval holds 0. (Where float64 itself rounds f' to 0, |z| > 19 for
                         tanh, > 37 for sigmoid, the true f' is below 1e-16.) Softmax, over a
                         row: |dp_i| <= e^(2E) min(p_i, 1 - p_i) (eZ_i + E) and <= E / 2,
                         E = max_row eZ (``_softmax_propagated``).
  evaluating f           c u (|f(Z)| + a(Z)) + tiny, c = 16 ulps: the kernels' exp-based
                         tanh, sigmoid, silu and erf-based gelu are 2-8 ulp each; a(Z) = |Z|
                         for gelu and gelu_tanh (0.5 z (1 + erf) and 0.5 z (1 + tanh) lose
                         |z| u to the 1 + (-1 + small) cancellation, and the C++ erfc of
                         Abramowitz & Stegun 7.1.26 has an absolute error 1.5e-7 = 1.26 u in
                         Phi, times |z|), 0 for the rest, |Z| for rows the table does not name.
                         Softmax: p_j = e_j / sum_k e_k with e_k = exp(z_k - m) (m the row
                         max), each e_k off by (c + |z_k - m|) u relative (the exp and the
                         rounding of its argument), the sum by gamma(n) more, so
                         |dp_j| <= (2c + n + |z_j - m| + sum_k p_k |z_k - m|) u p_j.
                         tiny: a result below the smallest normal may be flushed to 0 (FTZ on
                         a GPU, the C++ sigmoid's 0 below -88.72), or come out as the C++
                         exp's floor, e^-87.34 = 1.0000001 x the smallest normal (its
                         argument is clamped there): twice the smallest normal covers both.
                         sigmoid and silu go through e^-z, which overflows for z < -88.72
                         (fp32): they are 0 there (torch's too) while silu(z) is still as
                         large as 2.6e-37, so there the bound allows all of |f(z)|.
  D = f(Z) - Y           eD = L eZ + c u (|f(Z)| + a(Z) + |Y|) + tiny (the subtraction and
                         the scale are one rounding each, inside the c ulps)
  G_W = s D^T X          |dG_W| <= |s| ((gamma(R) (|D| + eD) + eD)^T |X|) + u |G_W|
                         (the sum of R products of perturbed D and exact X, then the scale)
  G_b = s sum_n D        the same with |X| replaced by ones
  + (W - W0) / eta       + 3 u |W - W0| / eta + u |G_W + (W - W0) / eta|   (the difference,
                         1/eta and the product; then the final add)
  + tiny                 the result itself may be flushed.

The O(u^2) terms dropped are below 1e-12 relative here. Every step is a worst case: the
largest errors measured stay far below the bound, while a wrong formula (a missing term, the
wrong activation, a dropped bias) exceeds it by orders of magnitude. NaN and +-inf follow
IEEE rules: wherever the float64 result is finite, every term of its sums is finite, and the
bound there is finite too (``assert_within`` fails on a NaN bound rather than skip it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from locoprop_kernels.activations import ACTIVATIONS

#: Unit roundoff of the compute dtype.
UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
#: Rounding errors of evaluating f, the subtraction and the scale, in units of u.
EVAL_ULPS = 16
#: Activations whose evaluation error is relative to |f(z)| alone; every other one (gelu,
#: gelu_tanh: a 1 + (-1 + small) cancellation; rows the table gains later) gets c u |z| too.
RELATIVE_ONLY = {"identity", "relu", "leaky_relu", "tanh", "sigmoid", "silu"}
#: Activations computed through e^-z (1 / (1 + e^-z), z / (1 + e^-z)): once e^-z overflows
#: (z below -log(max float), -88.72 in fp32) they give 0, as torch's do, where f(z) is still
#: normal for silu (|silu(-88.72)| = 2.6e-37): the whole |f(z)| is allowed there.
EXP_OF_MINUS_Z = {"sigmoid", "silu"}
ROW_WISE = {"softmax"}


def gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def flush_floor(dtype) -> float:
    """What a result below the normal range may be off by: twice the smallest normal."""
    return 2 * torch.finfo(dtype).tiny


#: Grid for f': spacing 1e-4 over [-40, 40]; f' is flat beyond (its tails are monotone).
_GRID_STEP, _GRID_END = 1e-4, 40.0
_ENVELOPES: dict = {}


def _envelope(activation: str):
    """(sup |f'| over the reals, tail_pos, tail_neg): tail_pos[i] = sup |f'| over t >= i h,
    tail_neg[i] = sup |f'| over t <= -i h, from |f'| on the grid in float64, times 1 + 1e-3
    for the sup between grid points (f' changes by <= h |f''| between them, a relative 1e-4
    where f' is a smooth bump or an exponential tail)."""
    if activation not in _ENVELOPES:
        n = int(round(_GRID_END / _GRID_STEP))
        t = torch.linspace(-_GRID_END, _GRID_END, 2 * n + 1, dtype=torch.float64,
                           requires_grad=True)
        ACTIVATIONS[activation].f(t).sum().backward()
        slope = t.grad.abs() * (1 + 1e-3)
        tail_pos = slope[n:].flip(0).cummax(0).values.flip(0)   # index i: t = i h
        tail_neg = slope[:n + 1].cummax(0).values.flip(0)        # index i: t = -i h
        _ENVELOPES[activation] = (float(slope.max()), tail_pos, tail_neg)
    return _ENVELOPES[activation]


def lipschitz(activation: str) -> float:
    """sup |f'| of an element-wise activation over the reals (see ``_envelope``)."""
    return _envelope(activation)[0]


def local_lipschitz(activation: str, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """A bound on sup |f'| over [z - e, z + e], element-wise: the tail envelope from the end
    of the interval nearest 0 (rounded towards 0 to the grid, so the envelope covers the
    interval) when the interval lies on one side of 0, else sup |f'| over the reals. Far in a
    saturating tail (|z| = 1e4, where eZ is 1e-3) this is ~0 where the global constant would
    allow 0.25 eZ. Beyond the grid the envelope's last value holds (flat tails)."""
    sup, tail_pos, tail_neg = _envelope(activation)
    n = tail_pos.numel() - 1
    lo, hi = z - e, z + e
    def index(r):  # grid index at or below r >= 0 (NaN: 0, masked out below)
        return torch.nan_to_num(r / _GRID_STEP, nan=0.0).floor().clamp(0, n).long()

    pos = tail_pos[index(lo.clamp_min(0)).reshape(-1)].reshape(z.shape)
    neg = tail_neg[index((-hi).clamp_min(0)).reshape(-1)].reshape(z.shape)
    full = torch.full_like(z, sup)
    out = torch.where(lo > 0, pos, torch.where(hi < 0, neg, full))
    return torch.where(z.isnan() | e.isnan(), torch.full_like(z, float("nan")), out)


def _softmax_propagated(p: torch.Tensor, e_z: torch.Tensor) -> torch.Tensor:
    """A bound on |p(z + d) - p(z)| (softmax over dim 1) for |d| <= e_z, element-wise. By the
    mean value theorem at some zeta on the segment, dp_i = p_i ((1 - p_i) d_i -
    sum_{k != i} p_k d_k), so |dp_i| <= p_i (1 - p_i) (e_i + E), E = max_row e_z; on the
    segment p_i and 1 - p_i grow by at most e^(2E), so |dp_i| <= e^(2E) min(p_i, 1 - p_i)
    (e_i + E), with 1 - p_i formed as sum_{k != i} p_k (no cancellation). Also
    |dp_i| <= E / 2 (p_i (1 - p_i) <= 1/4): the smaller of the two."""
    big_e = e_z.amax(dim=1, keepdim=True)
    valid = big_e < 1  # the local form needs e^(2E) finite and small; else E / 2 alone
    # 1 - p_i: exact enough as 1 - p_i where p_i <= 1/2; for the (at most one) entry above
    # 1/2, the sum of the others, which are all small.
    above = p > 0.5
    others = torch.where(above, torch.zeros_like(p), p).sum(dim=1, keepdim=True)
    rest = torch.where(above, others.expand_as(p), 1 - p)
    local = torch.exp(2 * big_e.clamp(max=1)) * torch.minimum(p, rest) * (e_z + big_e)
    half = 0.5 * big_e.expand_as(e_z)
    return torch.where(valid, torch.minimum(local, half), half)


class Linear:
    """Z = X W^T, G_W = D^T X: X (B, d_in), W (d_out, d_in), D (B, d_out)."""

    def __init__(self, weight_shape):
        self.weight_shape = tuple(weight_shape)
        self.K = self.weight_shape[1]

    def forward(self, x, w):
        return x @ w.T

    def weight_grad(self, x, d):
        return d.T @ x

    def rows(self, z):
        return z.shape[0]

    @staticmethod
    def bias_view(b):
        return b[None, :]

    @staticmethod
    def bias_sum(d):
        return d.sum(0)


class Conv2d:
    """Z = conv2d(X, W), G_W = its weight gradient of <D, Z>, with the layer's options."""

    def __init__(self, weight_shape, stride=1, padding=0, dilation=1, groups=1):
        self.weight_shape = tuple(weight_shape)
        self.K = int(torch.Size(self.weight_shape[1:]).numel())
        self.options = (stride, padding, dilation, groups)

    def forward(self, x, w):
        return F.conv2d(x, w, None, *self.options)

    def weight_grad(self, x, d):
        return torch.nn.grad.conv2d_weight(x, self.weight_shape, d, *self.options)

    def rows(self, z):
        return z.shape[0] * z.shape[2] * z.shape[3]

    @staticmethod
    def bias_view(b):
        return b[None, :, None, None]

    @staticmethod
    def bias_sum(d):
        return d.sum((0, 2, 3))


def _over_dim1(fn, t):
    return fn(t.movedim(1, -1)).movedim(-1, 1)


def _zero_where(mask, t):
    return torch.where(mask, torch.zeros((), dtype=t.dtype, device=t.device), t)


def _eval_error(activation, z, fz, u):
    """The error of evaluating an element-wise f at z (module docstring): c u |f(z)|, plus
    c u |z| for the activations that cancel in 1 + (-1 + small), plus |f(z)| itself where an
    e^-z overflow turns it into 0."""
    a = 0 if activation in RELATIVE_ONLY else _zero_where(z.isinf(), z.abs())
    e_eval = EVAL_ULPS * u * (fz.abs() + a)
    if activation in EXP_OF_MINUS_Z:
        dtype = torch.float32 if u == UNIT[torch.float32] else torch.float64
        overflow = z < -math.log(torch.finfo(dtype).max)
        e_eval = e_eval + torch.where(overflow, fz.abs(), torch.zeros_like(fz))
    return e_eval


def delta_error(layer, x, w, b, y, activation, u):
    """(D, eD): the float64 delta and the bound eD on the op's error in it (docstring)."""
    c = EVAL_ULPS
    tiny = flush_floor(torch.float32 if u == UNIT[torch.float32] else torch.float64)
    z = layer.forward(x, w) + (0 if b is None else layer.bias_view(b))
    f = ACTIVATIONS[activation].f
    fz = _over_dim1(f, z)
    z_inf = z.isinf()
    abs_b = 0 if b is None else layer.bias_view(b.abs())
    e_z = _zero_where(z_inf, gamma(layer.K + 1, u) * (layer.forward(x.abs(), w.abs()) + abs_b))
    if activation in ROW_WISE:
        propagated = _softmax_propagated(fz, e_z)
        m = z.amax(dim=1, keepdim=True)
        dev = _zero_where(z_inf, (z - m).abs())
        n = z.shape[1]
        weighted = (fz * dev).sum(dim=1, keepdim=True)
        e_eval = (2 * c + n + dev + weighted) * u * fz.abs()
    else:
        propagated = local_lipschitz(activation, z, e_z) * e_z
        e_eval = _eval_error(activation, z, fz, u)
    d = fz - y
    return d, propagated + e_eval + c * u * y.abs() + tiny


def matched_loss_grad_bound(layer, x, w, b, y, activation, *, scale=1.0, eta=None,
                            anchor_weight=None, anchor_bias=None, dtype=torch.float32):
    """Element-wise bounds (bound_W, bound_b) on |op - float64 reference| for the op computed
    in ``dtype`` on these inputs; bound_b is None without a bias."""
    u = UNIT[dtype]
    tiny = flush_floor(dtype)
    f64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    x, w, b, y = f64(x), f64(w), f64(b), f64(y)
    d, e_d = delta_error(layer, x, w, b, y, activation, u)
    rows = layer.rows(d)
    s = abs(scale)
    per_term = gamma(rows, u) * (d.abs() + e_d) + e_d
    g_w = scale * layer.weight_grad(x, d)
    bound_w = s * layer.weight_grad(x.abs(), per_term) + u * g_w.abs() + tiny
    bound_b = None
    if b is not None:
        g_b = scale * layer.bias_sum(d)
        bound_b = s * layer.bias_sum(per_term) + u * g_b.abs() + tiny
    if eta is not None:
        prox_w = (w - f64(anchor_weight)) / eta
        bound_w = bound_w + 3 * u * prox_w.abs() + u * (g_w + prox_w).abs()
        if b is not None:
            prox_b = (b - f64(anchor_bias)) / eta
            bound_b = bound_b + 3 * u * prox_b.abs() + u * (g_b + prox_b).abs()
    return bound_w, bound_b


def assert_within(got, want, bound, what=""):
    """NaN and +-inf exactly where the float64 reference has them; every finite entry within
    its own bound. Returns the largest error / bound ratio (for reports)."""
    got_d, want, bound = got.detach().double().cpu(), want.detach().cpu(), bound.cpu()
    assert got_d.shape == want.shape, f"{what}: shape {tuple(got_d.shape)} != {tuple(want.shape)}"
    nan_got, nan_want = got_d.isnan(), want.isnan()
    assert torch.equal(nan_got, nan_want), (
        f"{what}: NaN pattern differs ({int(nan_got.sum())} got vs {int(nan_want.sum())} want)")
    for name, fn in (("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(fn(got_d), fn(want)), f"{what}: {name} pattern differs"
    finite = want.isfinite()
    if not finite.any():
        return 0.0
    err, lim = (got_d - want).abs()[finite], bound[finite]
    assert not lim.isnan().any(), f"{what}: NaN bound at a finite entry (a bug in the bound)"
    ratio = (err / lim).max().item()
    worst = int((err / lim).argmax())
    assert ratio <= 1.0, (f"{what}: error {err[worst].item():.3e} > derived bound "
                          f"{lim[worst].item():.3e} at a finite entry (ratio {ratio:.3g}; "
                          f"want {want[finite][worst].item():.6e})")
    return ratio


def local_targets_bound(z, grad, activation, gamma_, *, variant="M", dtype=torch.float32):
    """Element-wise bound on |op - float64 reference| for Y = f(Z) - gamma G (variant "M";
    "S": f = identity), computed in ``dtype``: evaluating f as in ``delta_error`` (no GEMM, so
    no propagated error), the product gamma G and the subtraction (c ulps cover both), and
    the flush of a subnormal result."""
    u = UNIT[dtype]
    c = EVAL_ULPS
    tiny = flush_floor(dtype)
    z, grad = z.detach().double().cpu(), grad.detach().double().cpu()
    act = "identity" if variant == "S" else activation
    fz = ACTIVATIONS[act].f(z)
    z_inf = z.isinf()
    if act in ROW_WISE:
        dev = _zero_where(z_inf, (z - z.amax(dim=-1, keepdim=True)).abs())
        weighted = (fz * dev).sum(dim=-1, keepdim=True)
        e_eval = (2 * c + z.shape[-1] + dev + weighted) * u * fz.abs()
    else:
        e_eval = _eval_error(act, z, fz, u)
    return e_eval + c * u * abs(gamma_) * grad.abs() + tiny
