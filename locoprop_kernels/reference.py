"""Pure-PyTorch LocoProp math: the oracle every backend is tested against.

Plain, readable PyTorch in whatever dtype it is given (the tests call it in float64). Shapes:
X (B, d_in), W (d_out, d_in) as ``nn.Linear``, b (d_out,) or None, Y and G (B, d_out).
The math is docs/design.md section 2; nothing here is fused or clever on purpose. Conv2d layers
(``*_conv2d``, at the end) are the same math with one row per output position.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .activations import get_activation
from .choices import VARIANTS, Variant
from .rmsprop_options import STYLES


def preactivation(x: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Z = X W^T + b, shape (B, d_out)."""
    z = x @ weight.T
    return z if bias is None else z + bias


def delta(x, weight, bias, target, activation: str) -> torch.Tensor:
    """D = f(X W^T + b) - Y, shape (B, d_out); softmax is taken row-wise."""
    return get_activation(activation).f(preactivation(x, weight, bias)) - target


def matched_loss_grad(x, weight, bias, target, activation: str, *, scale: float = 1.0,
                      anchor_weight=None, anchor_bias=None, eta: Optional[float] = None,
                      anchor_preact=None):
    """Gradient of the layer's local objective in (W, b).

    grad_W = scale * D^T X [+ (W - W0)/eta]      (d_out, d_in)
    grad_b = scale * sum_n D_n [+ (b - b0)/eta]  (d_out,), None when bias is None

    With ``anchor_preact`` Z0 the pre-activation in D is taken in its delta form,
    Z = Z0 + X (W - W0)^T + (b - b0) (``lk.matched_loss_grad``'s docstring says why).
    """
    if anchor_preact is None:
        d = delta(x, weight, bias, target, activation)
    else:
        z = anchor_preact + x @ (weight - anchor_weight).T
        if bias is not None:
            z = z + (bias - anchor_bias)
        d = get_activation(activation).f(z) - target
    grad_w = scale * (d.T @ x)
    grad_b = None if bias is None else scale * d.sum(0)
    if eta is not None:
        grad_w = grad_w + (weight - anchor_weight) / eta
        if bias is not None:
            grad_b = grad_b + (bias - anchor_bias) / eta
    return grad_w, grad_b


def _prox_objective(weight, bias, anchor_weight, anchor_bias, eta):
    """||(W, b) - (W0, b0)||^2 / (2 eta), 0 without eta: the prox part of a local objective."""
    if eta is None:
        return 0.0
    prox = ((weight - anchor_weight) ** 2).sum()
    if bias is not None:
        prox = prox + ((bias - anchor_bias) ** 2).sum()
    return prox / (2.0 * eta)


def local_objective(x, weight, bias, target, activation: str, *, scale: float = 1.0,
                    anchor_weight=None, anchor_bias=None, eta: Optional[float] = None):
    """scale * sum_n [F(z_n) - y_n . z_n] (+ ||(W,b) - (W0,b0)||^2 / (2 eta)): a scalar.

    Its gradient in (W, b) is ``matched_loss_grad``; used for monitoring and in the tests.
    """
    act = get_activation(activation)
    z = preactivation(x, weight, bias)
    value = scale * (act.potential(z) - (target * z).sum(-1)).sum()
    return value + _prox_objective(weight, bias, anchor_weight, anchor_bias, eta)


def local_targets(preact, grad_preact, activation: str, gamma: float, *, variant: str = "M"):
    """Per-neuron targets from one backward pass (G = dL/dZ already holds L's 1/B).

    variant "M": Y = f(Z) - gamma * G  (a post-activation target, matched loss of f)
    variant "S": Y = Z - gamma * G     (a pre-activation target; the layer then uses identity)
    """
    if variant not in VARIANTS:
        raise ValueError(f"local_targets: argument 'variant' expected one of {VARIANTS}, got "
                         f"{variant!r}")
    f = get_activation(Variant(variant).local_activation(activation)).f  # S: identity
    return f(preact) - gamma * grad_preact


def rmsprop_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  square_avgs: Sequence[torch.Tensor], momentum_bufs=None, grad_avgs=None, *,
                  lr, style: str = "tf", alpha: float = 0.9, eps: float = 1e-5,
                  weight_decay: float = 0.0, momentum: float = 0.999, centered: bool = False,
                  maximize: bool = False) -> None:
    """RMSProp in place over lists of tensors, math in fp32 (or fp64) whatever the storage.

        g  = -g if maximize;  g = g + weight_decay p  if weight_decay != 0
        ms = alpha ms + (1 - alpha) g^2
        v  = ms - ga^2, ga = lerp(ga, g, 1 - alpha)  if centered, else v = ms
        "torch" (torch.optim.RMSprop, ms starts at 0): d = g / (sqrt(v) + eps)
        "tf"    (TF1, ms starts at 1):                 d = lr g / sqrt(v + eps)
        momentum != 0: buf = momentum buf + d, d = buf
        "torch": p -= lr d;   "tf": p -= d

    The operations follow ``torch.optim.RMSprop(foreach=False)`` one for one, so that style
    "torch" matches it to rounding. ``momentum_bufs`` is read only when momentum != 0 and
    ``grad_avgs`` only when centered. ``lr`` is a float or a 0-d tensor.
    """
    if style not in STYLES:
        raise ValueError(f"rmsprop_step_: argument 'style' expected 'tf' or 'torch', got {style!r}")
    for i, (p, g, ms) in enumerate(zip(params, grads, square_avgs)):
        math_dtype = torch.promote_types(p.dtype, torch.float32)
        g = g.to(math_dtype)
        p_math = p.to(math_dtype)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p_math, alpha=weight_decay)
        ms_math = ms.to(math_dtype).mul(alpha).addcmul(g, g, value=1 - alpha)
        ms.copy_(ms_math)
        v = ms_math
        if centered:
            ga = grad_avgs[i].to(math_dtype).lerp(g, 1 - alpha)
            grad_avgs[i].copy_(ga)
            v = ms_math.addcmul(ga, ga, value=-1)
        if style == "tf":
            step = lr * g / torch.sqrt(v + eps)
        else:
            step = g / (torch.sqrt(v) + eps)
        if momentum != 0:
            step = momentum_bufs[i].to(math_dtype) * momentum + step
            momentum_bufs[i].copy_(step)
        if style == "torch":
            step = lr * step
        p.copy_(p_math - step)


# ---------------------------------------------------------------- Conv2d layers
#
# A Conv2d layer is a Linear layer applied at every output position: with X (N, C_in, H, W),
# W (C_out, C_in/groups, kh, kw), b (C_out,) or None and Z = conv2d(X, W, b)
# (N, C_out, H_out, W_out), the "rows" of section 2 are the N * H_out * W_out positions
# (n, h, w) and the "columns" are the C_out channels. Everything row-wise in section 2 is
# therefore channel-wise here: f acts on the channel vector z[n, :, h, w] (softmax over dim 1)
# and the potential F is summed over channels and positions.


def _over_channels(fn, t: torch.Tensor) -> torch.Tensor:
    """fn (written for a channel vector on the last dim) applied over dim 1 of (N, C, H, W)."""
    return fn(t.movedim(1, -1)).movedim(-1, 1)


def conv2d_preactivation(x, weight, bias, *, stride=1, padding=0, dilation=1,
                         groups=1) -> torch.Tensor:
    """Z = conv2d(X, W) + b, shape (N, C_out, H_out, W_out)."""
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv2d_delta(x, weight, bias, target, activation: str, *, stride=1, padding=0,
                 dilation=1, groups=1) -> torch.Tensor:
    """D = f(conv2d(X, W) + b) - Y, shape (N, C_out, H_out, W_out); f acts on the channel
    vector at every position (softmax over dim 1)."""
    z = conv2d_preactivation(x, weight, bias, stride=stride, padding=padding,
                             dilation=dilation, groups=groups)
    return _over_channels(get_activation(activation).f, z) - target


def matched_loss_grad_conv2d(x, weight, bias, target, activation: str, *, stride=1, padding=0,
                             dilation=1, groups=1, scale: float = 1.0, anchor_weight=None,
                             anchor_bias=None, eta: Optional[float] = None, anchor_preact=None):
    """Gradient of a Conv2d+f layer's local objective (``local_objective_conv2d``) in (W, b).

        D      = f(conv2d(X, W) + b) - Y                       (N, C_out, H_out, W_out)
        grad_W = scale * conv2d_weight_grad(X, D) [+ (W - W0)/eta]  (C_out, C_in/groups, kh, kw)
        grad_b = scale * sum_{n,h,w} D[n, :, h, w] [+ (b - b0)/eta]  (C_out,), None without bias

    conv2d_weight_grad(X, D) is the weight gradient of <D, conv2d(X, W)>, i.e. section 2's
    D^T X with one row per output position (and per group). Any stride, padding, dilation and
    groups (depthwise included). With ``anchor_preact`` Z0 the pre-activation in D is taken in
    its delta form, Z = Z0 + conv2d(X, W - W0) + (b - b0) (``lk.matched_loss_grad_conv2d``).
    """
    if anchor_preact is None:
        d = conv2d_delta(x, weight, bias, target, activation, stride=stride, padding=padding,
                         dilation=dilation, groups=groups)
    else:
        z = anchor_preact + conv2d_preactivation(
            x, weight - anchor_weight, None if bias is None else bias - anchor_bias,
            stride=stride, padding=padding, dilation=dilation, groups=groups)
        d = _over_channels(get_activation(activation).f, z) - target
    grad_w = scale * torch.nn.grad.conv2d_weight(x, weight.shape, d, stride, padding, dilation,
                                                 groups)
    grad_b = None if bias is None else scale * d.sum((0, 2, 3))
    if eta is not None:
        grad_w = grad_w + (weight - anchor_weight) / eta
        if bias is not None:
            grad_b = grad_b + (bias - anchor_bias) / eta
    return grad_w, grad_b


def local_objective_conv2d(x, weight, bias, target, activation: str, *, stride=1, padding=0,
                           dilation=1, groups=1, scale: float = 1.0, anchor_weight=None,
                           anchor_bias=None, eta: Optional[float] = None):
    """scale * sum_{n,h,w} [F(z[n,:,h,w]) - y[n,:,h,w] . z[n,:,h,w]]
    (+ ||(W,b) - (W0,b0)||^2 / (2 eta)): a scalar, F the potential of the table summed over
    channels. Its gradient in (W, b) is ``matched_loss_grad_conv2d``."""
    act = get_activation(activation)
    z = conv2d_preactivation(x, weight, bias, stride=stride, padding=padding,
                             dilation=dilation, groups=groups)
    value = scale * (act.potential(z.movedim(1, -1)).sum() - (target * z).sum())
    return value + _prox_objective(weight, bias, anchor_weight, anchor_bias, eta)


def local_targets_conv2d(preact, grad_preact, activation: str, gamma: float, *,
                         variant: str = "M"):
    """``local_targets`` for a Conv2d layer's Z and G = dL/dZ, (N, C_out, H_out, W_out):
    variant "M" Y = f(Z) - gamma G (f over the channels), "S" Y = Z - gamma G."""
    return _over_channels(
        lambda z: local_targets(z, grad_preact.movedim(1, -1), activation, gamma,
                                variant=variant), preact)
