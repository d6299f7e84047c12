"""Pure-PyTorch LocoProp math: the oracle every backend is tested against.

Plain, readable PyTorch in whatever dtype it is given (the tests call it in float64). Shapes:
X (B, d_in), W (d_out, d_in) as ``nn.Linear``, b (d_out,) or None, Y and G (B, d_out).
The math is DESIGN.md section 2; nothing here is fused or clever on purpose.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .activations import get_activation


def preactivation(x: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Z = X W^T + b, shape (B, d_out)."""
    z = x @ weight.T
    return z if bias is None else z + bias


def delta(x, weight, bias, target, activation: str) -> torch.Tensor:
    """D = f(X W^T + b) - Y, shape (B, d_out); softmax is taken row-wise."""
    return get_activation(activation).f(preactivation(x, weight, bias)) - target


def matched_loss_grad(x, weight, bias, target, activation: str, *, scale: float = 1.0,
                      anchor_weight=None, anchor_bias=None, eta: Optional[float] = None):
    """Gradient of the layer's local objective in (W, b).

    grad_W = scale * D^T X [+ (W - W0)/eta]      (d_out, d_in)
    grad_b = scale * sum_n D_n [+ (b - b0)/eta]  (d_out,), None when bias is None
    """
    d = delta(x, weight, bias, target, activation)
    grad_w = scale * (d.T @ x)
    grad_b = None if bias is None else scale * d.sum(0)
    if eta is not None:
        grad_w = grad_w + (weight - anchor_weight) / eta
        if bias is not None:
            grad_b = grad_b + (bias - anchor_bias) / eta
    return grad_w, grad_b


def local_objective(x, weight, bias, target, activation: str, *, scale: float = 1.0,
                    anchor_weight=None, anchor_bias=None, eta: Optional[float] = None):
    """scale * sum_n [F(z_n) - y_n . z_n] (+ ||(W,b) - (W0,b0)||^2 / (2 eta)): a scalar.

    Its gradient in (W, b) is ``matched_loss_grad``; used for monitoring and in the tests.
    """
    act = get_activation(activation)
    z = preactivation(x, weight, bias)
    value = scale * (act.potential(z) - (target * z).sum(-1)).sum()
    if eta is not None:
        prox = ((weight - anchor_weight) ** 2).sum()
        if bias is not None:
            prox = prox + ((bias - anchor_bias) ** 2).sum()
        value = value + prox / (2.0 * eta)
    return value


def local_targets(preact, grad_preact, activation: str, gamma: float, *, variant: str = "M"):
    """Per-neuron targets from one backward pass (G = dL/dZ already holds L's 1/B).

    variant "M": Y = f(Z) - gamma * G  (a post-activation target, matched loss of f)
    variant "S": Y = Z - gamma * G     (a pre-activation target; the layer then uses identity)
    """
    if variant == "M":
        return get_activation(activation).f(preact) - gamma * grad_preact
    if variant == "S":
        return preact - gamma * grad_preact
    raise ValueError(f"local_targets: argument 'variant' expected 'M' or 'S', got {variant!r}")


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
    if style not in ("tf", "torch"):
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
