"""The matched-loss gradient of a Conv2d layer's local objective
(``locoprop::matched_loss_grad_conv2d`` and its ``_out`` twin), over the shared half in
``_matched_loss.py``."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..validation import check_operand_dtype, check_tensor, fail_value
from ._checks import check_int, int_pair
from ._matched_loss import _OPTIONAL, _Layer, _call, _register

Tensor = torch.Tensor


# ---------------------------------------------------------------- Conv2d
#
# A Conv2d layer (docs/design.md section 2 with one row per output position): X (N, C_in, H, W),
# W (C_out, C_in/groups, kh, kw), b (C_out,) or None, Z = conv2d(X, W) + b and the targets
# Y (N, C_out, H_out, W_out). The rows of section 2 are the N * H_out * W_out positions, its
# columns the C_out channels: f acts on every position's channel vector (softmax over dim 1)
# and the potential F is summed over channels and positions.

def _conv2d_geometry(op, stride, padding, dilation, groups) -> tuple:
    """stride, padding, dilation as [h, w] lists of ints (>= 1, >= 0, >= 1); groups >= 1."""
    geometry = (int_pair(op, "stride", stride, 1), int_pair(op, "padding", padding, 0),
                int_pair(op, "dilation", dilation, 1), groups)
    check_int(op, "groups", groups, 1)
    return geometry


def _conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv2d_shapes(op, x, weight, stride, padding, dilation, groups):
    """x (N, C_in, H, W), weight (C_out, C_in/groups, kh, kw) -> bias (C_out,), target
    (N, C_out, H_out, W_out)."""
    check_tensor(op, "x", x)
    if x.dim() != 4:
        fail_value(op, "x", "a 4-D tensor (N, C_in, H, W)", tuple(x.shape))
    if x.shape[0] == 0:
        fail_value(op, "x", "a non-empty batch (N >= 1)", tuple(x.shape))
    if min(x.shape[1:]) == 0:
        fail_value(op, "x", "C_in, H, W >= 1", tuple(x.shape))
    N, C_in, H, W = x.shape
    _conv2d_geometry(op, stride, padding, dilation, groups)
    check_tensor(op, "weight", weight, device=x.device)
    check_operand_dtype(op, "x", x, "weight", weight.dtype, blame_param=True)
    if (weight.dim() != 4 or min(weight.shape) == 0 or weight.shape[0] % groups != 0
            or weight.shape[1] * groups != C_in):
        fail_value(op, "weight", f"shape (C_out, C_in/groups, kh, kw) with C_in/groups = "
                   f"{C_in}/{groups}, C_out a multiple of groups = {groups}, all >= 1",
                   tuple(weight.shape))
    C_out, _, kh, kw = weight.shape
    H_out = _conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    W_out = _conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if H_out < 1 or W_out < 1:
        fail_value(op, "x", f"a (padded) input at least the dilated kernel's size "
                   f"({dilation[0] * (kh - 1) + 1}, {dilation[1] * (kw - 1) + 1}) with padding "
                   f"{tuple(padding)}", tuple(x.shape))
    return (C_out,), (N, C_out, H_out, W_out), "(C_out,)", "(N, C_out, H_out, W_out)"


_CONV2D = _Layer(
    op="matched_loss_grad_conv2d",
    geometry=(("stride", List[int]), ("padding", List[int]), ("dilation", List[int]),
              ("groups", int)),
    check_geometry=_conv2d_geometry, check_shapes=_conv2d_shapes,
    backend_method="matched_loss_grad_conv2d_into",
    why_not_differentiable="it computes a gradient itself (of the Conv2d layer's local "
                           "matched loss in W and b, in closed form)",
    delta_form="Z0 + conv2d(X, W - W0) + (b - b0)", optional=_OPTIONAL)
_CONV2D_OPS = _register(_CONV2D)
_matched_loss_grad_conv2d_op = _CONV2D_OPS.op
_matched_loss_grad_conv2d_out_op = _CONV2D_OPS.out_op


def matched_loss_grad_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             target: Tensor, activation: str, *, stride=1, padding=0,
                             dilation=1, groups: int = 1, scale: float = 1.0,
                             anchor_weight: Optional[Tensor] = None,
                             anchor_bias: Optional[Tensor] = None, eta: Optional[float] = None,
                             backend: Optional[str] = None, precision: str = "ieee",
                             out: Optional[tuple] = None,
                             anchor_preact: Optional[Tensor] = None):
    """Gradient of a Conv2d+f layer's local LocoProp objective in (W, b).

    The layer is ``nn.Conv2d`` (any stride, padding, dilation, groups; depthwise included):
    X (N, C_in, H, W), W (C_out, C_in/groups, kh, kw), b (C_out,) or None, and
    Z = conv2d(X, W) + b (N, C_out, H_out, W_out). It is docs/design.md section 2 with one row
    per output position (n, h, w) and one column per channel:

        targets    Y = f(Z0) - gamma G  (variant M; G = dL/dZ, f over the channels)
                   Y = Z0 - gamma G     (variant S, with f = identity)
        objective  scale * sum_{n,h,w} [F(z[n,:,h,w]) - y[n,:,h,w] . z[n,:,h,w]]
                   [+ ||(W, b) - (W0, b0)||^2 / (2 eta)],  F the potential of the table
        Z      = conv2d(X, W) + b                                  (N, C_out, H_out, W_out)
               = Z0 + conv2d(X, W - W0) + (b - b0)   with anchor_preact = Z0 (the delta form)
        D      = f(Z) - Y                                          (N, C_out, H_out, W_out)
        grad_W = scale * conv2d_weight_grad(X, D) [+ (W - W0)/eta]  (W's shape)
        grad_b = scale * sum_{n,h,w} D[n, :, h, w] [+ (b - b0)/eta] (C_out,)

    f acts on each position's channel vector (softmax over dim 1, the channels). At W = W0
    the gradient is gamma times the backprop gradient of (W, b). conv2d_weight_grad(X, D) is
    the weight gradient of <D, conv2d(X, W)> (``torch.nn.grad.conv2d_weight``). ``stride``,
    ``padding`` and ``dilation`` are ints or pairs of ints as in ``nn.Conv2d`` (no string
    padding). target (N, C_out, H_out, W_out); all tensors on one device, dtypes as in
    ``matched_loss_grad`` (x and target may be bf16/fp16 under an fp32/fp64 weight; the math
    and the gradients are in the weight's dtype). Inputs in
    ``torch.channels_last`` memory format save the cpp and triton backends a copy of x and of
    the target. The prox term, ``precision`` (here: whether cuDNN may use TF32 for the fp32
    convolutions on CUDA) and ``out=(grad_weight, grad_bias)`` are as in
    ``matched_loss_grad``. Returns ``(grad_weight, grad_bias)``, grad_bias None when bias is
    None.

    ``anchor_preact`` Z0 (N, C_out, H_out, W_out; target's dtype rule, any memory format)
    turns on the delta form of Z on every backend, as ``matched_loss_grad``'s does for a
    Linear layer, and then needs ``anchor_weight`` W0 (and ``anchor_bias`` b0 when bias is
    given): Z = Z0 + conv2d(X, W - W0) + (b - b0), Z0 and the sum in the math dtype. The same
    function as without it when Z0 = conv2d(X, W0) + b0 (convolution is linear in W). Why:
    at "tf32" (cuDNN's TF32 path) or "bf16" the convolution's operands are rounded, and
    rounding W = W0 + dW moves Z by about the rounding unit of |Z|, which swamps the small
    inner update's conv2d(X, dW); rounding dW alone keeps it. Stage 2, conv2d_weight_grad(X,
    D), needs nothing of the kind: D and X are each rounded relative to themselves, no large
    term cancels. The prox term stays governed by ``eta`` alone.

    Not differentiable: inputs that require grad are accepted and give the same values, but a
    backward pass through the result raises (see RuntimeError below).

    Raises, before anything is written (each message names the op and the argument):
        TypeError: a tensor argument that is not a Tensor (or None where allowed), ``out``
            not a pair; a device that differs from x's; a dtype that breaks
            ``matched_loss_grad``'s rule (or that the backend does not support); stride /
            padding / dilation not an int or a pair of ints, groups not an int; a number
            that is not a float/int or a name that is not a str.
        ValueError: a wrong shape (x not 4-D, an empty batch or a zero C_in/H/W, weight not
            (C_out, C_in/groups, kh, kw), groups not dividing C_in and C_out, an input smaller
            than the dilated kernel, bias not (C_out,), target not
            (N, C_out, H_out, W_out)), stride or dilation < 1, padding < 0, groups < 1, an
            unknown activation, precision or backend name, a non-finite scale, eta <= 0, eta
            or anchor_preact without anchor_weight (anchor_bias when bias is given),
            anchor_bias without bias, anchor_preact not of target's shape, out_bias given
            exactly when bias is not, ``out`` overlapping an input, or a backend that cannot
            run here.
        RuntimeError: with ``out=``, when grad mode is on and any tensor argument requires
            grad; without ``out=``, when a backward pass reaches the returned gradients
            ("locoprop.matched_loss_grad_conv2d is not differentiable: ...").
    """
    return _call(_CONV2D, _CONV2D_OPS, x, weight, bias, target, activation,
                 (stride, padding, dilation, groups), scale,
                 anchor_weight, anchor_bias, eta, backend, precision, out, anchor_preact)
