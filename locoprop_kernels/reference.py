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
                  square_avgs: Sequence[torch.Tensor], momentum_bufs, *, lr: float,
                  alpha: float = 0.9, eps: float = 1e-5, momentum: float = 0.999,
                  style: str = "tf") -> None:
    """RMSProp in place over lists of tensors, math in fp32 (or higher) whatever the storage.

    style "tf"    (TF1, ms starts at 1): ms = a*ms + (1-a) g^2; mom = m*mom + lr g / sqrt(ms+eps);
                  p -= mom
    style "torch" (torch.optim.RMSprop, ms starts at 0): ms = a*ms + (1-a) g^2;
                  avg = sqrt(ms) + eps; with momentum buf = m*buf + g/avg, p -= lr*buf;
                  without, p -= lr*g/avg
    ``momentum_bufs`` may be None when momentum == 0.
    """
    if style not in ("tf", "torch"):
        raise ValueError(f"rmsprop_step_: argument 'style' expected 'tf' or 'torch', got {style!r}")
    bufs = momentum_bufs if momentum_bufs is not None else [None] * len(params)
    for p, g, ms, buf in zip(params, grads, square_avgs, bufs):
        math_dtype = torch.promote_types(p.dtype, torch.float32)
        g32 = g.to(math_dtype)
        ms32 = ms.to(math_dtype).mul(alpha).addcmul(g32, g32, value=1.0 - alpha)
        ms.copy_(ms32)
        if style == "tf":
            step = lr * g32 / torch.sqrt(ms32 + eps)
            if buf is not None:
                step = buf.to(math_dtype) * momentum + step
                buf.copy_(step)
        else:
            step = g32 / (torch.sqrt(ms32) + eps)
            if momentum != 0.0:
                step = buf.to(math_dtype) * momentum + step
                buf.copy_(step)
            step = lr * step
        p.copy_(p.to(math_dtype) - step)
