"""The matched-loss gradient of a Linear layer's local objective (``locoprop::matched_loss_grad``
and its ``_out`` twin), over the shared half in ``_matched_loss.py``; and
``repeatable_matched_loss_grad``, one checked call repeated by the backend alone."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ..activations import get_activation
from ..validation import check_matrix, check_operand_dtype, check_tensor, fail_value
from ._checks import backend_arg
from ._matched_loss import _OPTIONAL, _Layer, _call, _optional_kwargs, _plain, _register
from ._registry import autocast_off
from .matched_loss_conv2d import _CONV2D, _CONV2D_OPS

Tensor = torch.Tensor


# ---------------------------------------------------------------- Linear

def _linear_shapes(op, x, weight):
    """x (B, d_in), weight (d_out, d_in) -> bias (d_out,), target (B, d_out)."""
    check_matrix(op, "x", x, rows_name="B", cols_name="d_in")
    B, d_in = x.shape
    check_tensor(op, "weight", weight, device=x.device)
    check_operand_dtype(op, "x", x, "weight", weight.dtype, blame_param=True)
    if weight.dim() != 2 or weight.shape[1] != d_in or weight.shape[0] == 0:
        fail_value(op, "weight", f"shape (d_out, d_in) with d_in = {d_in} and d_out >= 1",
                   tuple(weight.shape))
    d_out = weight.shape[0]
    return (d_out,), (B, d_out), "(d_out,)", "(B, d_out)"


_LINEAR = _Layer(
    op="matched_loss_grad", geometry=(), check_geometry=lambda op: (),
    check_shapes=_linear_shapes, backend_method="matched_loss_grad_into",
    why_not_differentiable="it computes a gradient itself (of the layer's local matched loss "
                           "in W and b, in closed form)",
    delta_form="Z0 + X (W - W0)^T + (b - b0)", optional=_OPTIONAL)
_LINEAR_OPS = _register(_LINEAR)
_matched_loss_grad_op, _matched_loss_grad_out_op = _LINEAR_OPS.op, _LINEAR_OPS.out_op


def matched_loss_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                      activation: str, *, scale: float = 1.0,
                      anchor_weight: Optional[Tensor] = None,
                      anchor_bias: Optional[Tensor] = None, eta: Optional[float] = None,
                      backend: Optional[str] = None, precision: str = "ieee",
                      out: Optional[tuple] = None, anchor_preact: Optional[Tensor] = None):
    """Gradient of a Linear+f layer's local LocoProp objective in (W, b).

        Z      = X W^T + b                            (B, d_out)
               = Z0 + X (W - W0)^T + (b - b0)         with anchor_preact = Z0 (the delta form)
        D      = f(Z) - Y                             (B, d_out); softmax row-wise
        grad_W = scale * D^T X  [+ (W - W0) / eta]    (d_out, d_in)
        grad_b = scale * D.sum(0) [+ (b - b0) / eta]  (d_out,)

    x (B, d_in), weight (d_out, d_in), bias (d_out,) or None, target (B, d_out), all on one
    device. Dtypes (the module docstring): bias and the anchors have the weight's dtype; x
    and target the weight's dtype or, with an fp32/fp64 weight, bf16/fp16 (mixed precision:
    the inputs ``torch.autocast`` records for a layer with fp32 parameters); the math is in
    the weight's dtype (fp32 for half storage) and the gradients are returned in it. The prox
    term is on when ``eta`` is given (``anchor_weight`` / ``anchor_bias`` are W0 / b0).
    ``precision`` "ieee", "tf32" or "bf16" picks the GEMMs' operands on the GPU (triton
    backend; docs/design.md section 4).

    ``anchor_preact`` Z0 (B, d_out; target's dtype rule) turns on the delta form of Z, on
    every backend, and then needs ``anchor_weight`` W0 (and ``anchor_bias`` b0 when bias is
    given). It is the same function as without it when Z0 = X W0^T + b0 (LocoProp's inner
    iterations: Z0 is the layer's recorded pre-activation, W0, b0 the step's starting
    weights). Why: with tf32/bf16 operands, rounding W = W0 + dW to the operand format moves
    Z by about the rounding unit of |Z|, which swamps X dW^T when the update dW is small, so
    D (a difference f(Z) - f(Z0) + ...) is mostly rounding noise: its error grows like the
    rounding unit over |dW|/|W|. The delta form rounds only dW and adds Z0 (and b - b0) in
    fp32, so the error stays at the rounding unit. The prox term stays governed by ``eta``
    alone (W0 is its centre when both are given).
    ``out=(grad_weight, grad_bias)`` writes into given tensors (e.g. arena views, of any float
    dtype; grad_bias None when bias is None) and returns them. Returns
    ``(grad_weight, grad_bias)``, grad_bias None when bias is None.

    Not differentiable: inputs that require grad are accepted and give the same values, but a
    backward pass through the result raises (see RuntimeError below).

    Raises, before anything is written (each message names the op and the argument):
        TypeError: a tensor argument that is not a Tensor (or None where allowed), ``out``
            not a pair; a device that differs from x's; a dtype that breaks the rule above
            (x / target neither the weight's dtype nor a half dtype under an fp32/fp64
            weight; a weight less precise than x; bias / anchors not the weight's dtype) or
            that the backend does not support; a number that is not a float/int or a name
            that is not a str.
        ValueError: a wrong shape (not 2-D, d_in / d_out / B mismatched), an empty batch, an
            unknown activation, precision or backend name, a non-finite scale, eta <= 0,
            eta or anchor_preact without anchor_weight (anchor_bias when bias is given),
            anchor_bias without bias, anchor_preact not of target's shape, out_bias given
            exactly when bias is not, ``out`` overlapping an input, or a backend that cannot
            run here ("cpp" without the extension, "triton" on CPU without
            TRITON_INTERPRET=1).
        RuntimeError: with ``out=``, when grad mode is on and any tensor argument requires
            grad (autograd cannot record a write into ``out``); without ``out=``, when a
            backward pass reaches the returned gradients
            ("locoprop.matched_loss_grad is not differentiable: ...").
    """
    return _call(_LINEAR, _LINEAR_OPS, x, weight, bias, target, activation, (), scale,
                 anchor_weight, anchor_bias, eta, backend, precision, out, anchor_preact)


def repeatable_matched_loss_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                 target: Tensor, activation: str, *,
                                 conv2d: Optional[dict] = None, scale: float = 1.0,
                                 backend: Optional[str] = None, precision: str = "ieee",
                                 anchor_preact: Optional[Tensor] = None,
                                 anchor_weight: Optional[Tensor] = None,
                                 anchor_bias: Optional[Tensor] = None):
    """``(grad_weight, grad_bias, again)``: ``matched_loss_grad`` (or, with ``conv2d`` =
    its stride/padding/dilation/groups keywords, ``matched_loss_grad_conv2d``) without a prox
    term, checked and run, and ``again()``, which runs the same call once more into the same
    two tensors: the backend kernel only, no validation and no dispatcher. ``anchor_preact``,
    ``anchor_weight``, ``anchor_bias``: the delta form of stage 1 (see
    ``matched_loss_grad`` / ``matched_loss_grad_conv2d``), Z0, W0 and b0 read at every call
    (they may change in place too).

    For loops that repeat one checked call on the same tensor objects whose values change in
    place (the per-layer inner iterations t >= 2 of ``lk.optim.LocoProp``): for a small layer
    the checks and the ``torch.library`` dispatch cost more than the kernel. Never change the
    tensors' shapes, dtypes or devices between calls: nothing in ``again`` would catch it."""
    layer, registered = (_LINEAR, _LINEAR_OPS) if conv2d is None else (_CONV2D, _CONV2D_OPS)
    geometry = () if conv2d is None else (conv2d.get("stride", 1), conv2d.get("padding", 0),
                                          conv2d.get("dilation", 1), conv2d.get("groups", 1))
    grad_weight, grad_bias = _call(layer, registered, x, weight, bias, target, activation,
                                   geometry, scale, anchor_weight, anchor_bias, None, backend,
                                   precision, None, anchor_preact)
    if anchor_preact is None:  # as the op: W0, b0 unused without eta and Z0, never read
        anchor_weight = anchor_bias = None
    optional = _optional_kwargs(layer, anchor_preact)
    be = backends.resolve(layer.op, backend_arg(layer.op, backend), x.device, weight.dtype,
                          activation=get_activation(activation))
    write = getattr(be, layer.backend_method)
    plain = _plain(layer.check_geometry(layer.op, *geometry))
    scale = float(scale)

    def again() -> None:
        with autocast_off(x.device):
            write(x, weight, bias, target, activation, *plain, scale, anchor_weight,
                  anchor_bias, None, grad_weight, grad_bias, precision, **optional)

    return grad_weight, grad_bias, again
