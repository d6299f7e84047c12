"""The matched-loss gradients of one layer's local LocoProp objective: Linear and Conv2d.

Both are docs/design.md section 2's gradient (D = f(Z) - Y against X, plus the prox term), the
rows being the batch (Linear) or the output positions (Conv2d). They share all but one
``_Layer`` each (its geometry, the shapes of x and weight, its backend method): the checks of
bias, target, scale, prox and ``out=``, the backend call, the outputs and the public path.

    locoprop::matched_loss_grad[_conv2d]       returns [grad_weight, grad_bias]; grad_bias is
                                               empty when bias is None (a Tensor[] holds no None)
    locoprop::matched_loss_grad[_conv2d]_out   writes into out_weight / out_bias (arena slices)

The Linear ops take one more argument, last and defaulting to None: ``anchor_preact`` Z0, the
delta form of stage 1 (``matched_loss_grad``'s docstring).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .. import backends
from ..activations import get_activation
from ..validation import (check_call_types, check_choice, check_matrix, check_no_overlap,
                          check_number, check_operand_dtype, check_tensor, fail_type,
                          fail_value)
from ._checks import (backend_arg, check_backend_dtype, check_int, int_pair,
                      refuse_in_place_autograd)
from ..choices import PRECISIONS
from ._registry import Params, autocast_off, register

Tensor = torch.Tensor

# The ops' parameters, in schema order: inputs, the layer's geometry (Conv2d only), objective.
_INPUTS = (("x", Tensor), ("weight", Tensor), ("bias", Optional[Tensor]), ("target", Tensor),
           ("activation", str))
_OBJECTIVE = (("scale", float), ("anchor_weight", Optional[Tensor]),
              ("anchor_bias", Optional[Tensor]), ("eta", Optional[float]), ("backend", str),
              ("precision", str))
_OUTS = (("out_weight", Tensor), ("out_bias", Optional[Tensor]))
#: Parameters added after the schemas were first published: last, defaulting to None
#: (``_registry.register``'s ``optional``), so that positional calls of the ops still bind.
_LINEAR_OPTIONAL = (("anchor_preact", Optional[Tensor]),)


@dataclass(frozen=True)
class _Layer:
    """What one layer type's matched-loss op has of its own."""

    #: The op's name (``locoprop::<op>``, ``locoprop.<op>`` in messages).
    op: str
    #: Its parameters between ``activation`` and ``scale`` (schema order).
    geometry: Params
    #: (op, *geometry) -> the geometry checked and normalized, a tuple in schema order.
    check_geometry: Callable
    #: (op, x, weight, *geometry) -> (bias shape, target shape, their names for messages),
    #: after checking x, weight and their dtypes.
    check_shapes: Callable
    #: The ``base.Backend`` method that writes the gradient (the geometry after activation).
    backend_method: str
    #: For the error a backward pass raises.
    why_not_differentiable: str
    #: Its parameters with a default of None, last in the schema (``_LINEAR_OPTIONAL``); the
    #: ones of ``_OPTIONAL_NAMES`` it lacks are None in ``_split``.
    optional: Params = ()


#: Every optional parameter a layer type may have, in the order ``_split`` returns them.
_OPTIONAL_NAMES = ("anchor_preact",)


def _check_scale_prox_out(op, x, weight, bias, target, scale, anchor_weight, anchor_bias, eta,
                          precision, anchor_preact, out_weight, out_bias):
    """The arguments both matched-loss gradients (Linear, Conv2d) share: scale, precision, the
    prox term (eta, W0, b0: weight's and bias's shapes), the anchored pre-activation Z0
    (target's shape and dtype rule; it needs W0, and b0 with a bias) and ``out=`` (no overlap
    with inputs)."""
    check_number(op, "scale", scale)
    check_choice(op, "precision", precision, PRECISIONS)
    if anchor_preact is not None:
        if anchor_weight is None:
            fail_value(op, "anchor_weight", "a tensor when anchor_preact is given (the W0 of "
                       "Z = Z0 + X (W - W0)^T + (b - b0))", None)
        if bias is not None and anchor_bias is None:
            fail_value(op, "anchor_bias", "a tensor when anchor_preact is given and bias is "
                       "not None (the b0 of Z = Z0 + X (W - W0)^T + (b - b0))", None)
        check_tensor(op, "anchor_preact", anchor_preact, device=x.device)
        check_operand_dtype(op, "anchor_preact", anchor_preact, "weight", weight.dtype)
        check_tensor(op, "anchor_preact", anchor_preact, shape=tuple(target.shape),
                     what=" (target's shape)")
    if eta is not None:
        check_number(op, "eta", eta, low=0.0, low_open=True)
        if anchor_weight is None:
            fail_value(op, "anchor_weight", "a tensor when eta is given (the prox center W0)",
                       None)
        if bias is not None and anchor_bias is None:
            fail_value(op, "anchor_bias", "a tensor when eta is given and bias is not None",
                       None)
    if anchor_weight is not None:
        check_tensor(op, "anchor_weight", anchor_weight, shape=tuple(weight.shape),
                     device=x.device, dtype=weight.dtype, what=" (weight's shape and dtype)")
    if anchor_bias is not None:
        if bias is None:
            fail_value(op, "anchor_bias", "None when bias is None", "a tensor")
        check_tensor(op, "anchor_bias", anchor_bias, shape=tuple(bias.shape), device=x.device,
                     dtype=weight.dtype, what=" (bias's shape and dtype)")
    if out_weight is not None:
        check_tensor(op, "out_weight", out_weight, shape=tuple(weight.shape), device=x.device,
                     what=" (weight's shape)")
        if (bias is None) != (out_bias is None):
            fail_value(op, "out_bias", "a tensor exactly when bias is given",
                       "None" if out_bias is None else "a tensor")
        if out_bias is not None:
            check_tensor(op, "out_bias", out_bias, shape=tuple(bias.shape), device=x.device,
                         what=" (bias's shape)")
        check_no_overlap(op, written=[("out_weight", out_weight), ("out_bias", out_bias)],
                         read=[("x", x), ("weight", weight), ("bias", bias), ("target", target),
                               ("anchor_weight", anchor_weight), ("anchor_bias", anchor_bias),
                               ("anchor_preact", anchor_preact)])


def _check_bias_target(op, x, weight, bias, target, bias_shape, target_shape, bias_what,
                       target_what):
    """bias: weight's dtype; target: weight's dtype or a lower-precision operand dtype
    (``validation.OPERAND_DTYPES``); both on x's device, of the given shapes."""
    if bias is not None:
        check_tensor(op, "bias", bias, device=x.device, dtype=weight.dtype,
                     what=" (weight's dtype)")
        check_tensor(op, "bias", bias, shape=bias_shape, what=f" {bias_what}")
    check_tensor(op, "target", target, device=x.device)
    check_operand_dtype(op, "target", target, "weight", weight.dtype)
    check_tensor(op, "target", target, shape=target_shape, what=f" {target_what}")


def _split(layer: _Layer, rest: tuple):
    """An op's arguments after ``activation``, in ``register``'s canonical order (geometry,
    objective, optional, outputs) -> (the geometry, a tuple; scale, anchor_weight,
    anchor_bias, eta, backend, precision, anchor_preact, out_weight, out_bias): the optional
    parameters the layer type lacks None, the outputs None where the call has none (the
    functional op's check and fake)."""
    n, n_opt = len(layer.geometry), len(layer.optional)
    objective, optional = rest[n:n + len(_OBJECTIVE)], rest[n + len(_OBJECTIVE):][:n_opt]
    given = dict(zip((name for name, _ in layer.optional), optional))
    outs = (*rest[n + len(_OBJECTIVE) + n_opt:], None, None)[:2]
    return rest[:n], (*objective, *(given.get(name) for name in _OPTIONAL_NAMES), *outs)


def _check(layer: _Layer, x, weight, bias, target, activation, *rest):
    """Every argument of the matched-loss gradient, before anything is written."""
    op = layer.op
    geometry, (scale, anchor_weight, anchor_bias, eta, _, precision, anchor_preact, out_weight,
               out_bias) = _split(layer, rest)
    get_activation(activation, op=f"locoprop.{op}")
    bias_shape, target_shape, bias_what, target_what = layer.check_shapes(op, x, weight,
                                                                          *geometry)
    _check_bias_target(op, x, weight, bias, target, bias_shape, target_shape, bias_what,
                       target_what)
    _check_scale_prox_out(op, x, weight, bias, target, scale, anchor_weight, anchor_bias, eta,
                          precision, anchor_preact, out_weight, out_bias)


def _allocate(x, weight, bias, *_):
    """(grad_weight, grad_bias), empty: weight's shape and dtype (contiguous), grad_bias of
    length 0 when bias is None."""
    gb_len = weight.shape[0] if bias is not None else 0
    return [torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((gb_len,))]


def _run(layer: _Layer, x, weight, bias, target, activation, *rest):
    op = layer.op
    geometry, (scale, anchor_weight, anchor_bias, eta, backend, precision, anchor_preact,
               out_weight, out_bias) = _split(layer, rest)
    be = backends.resolve(op, backend, x.device, weight.dtype,
                          activation=get_activation(activation))
    check_backend_dtype(op, be, "x", x)
    check_backend_dtype(op, be, "weight", weight)
    if eta is None and anchor_preact is None:  # W0, b0 unused: never read them
        anchor_weight = anchor_bias = None
    if bias is None:  # the functional op's empty grad_bias: nothing to write
        out_bias = None
    with autocast_off(x.device):
        getattr(be, layer.backend_method)(
            x, weight, bias, target, activation, *_plain(geometry), float(scale),
            anchor_weight, anchor_bias, eta, out_weight, out_bias, precision,
            **_optional_kwargs(layer, anchor_preact))


def _optional_kwargs(layer: _Layer, anchor_preact) -> dict:
    """The backend method's keywords for the layer type's optional parameters."""
    return {"anchor_preact": anchor_preact} if layer.optional else {}


def _plain(geometry: tuple) -> list:
    """The geometry as the backends take it: lists of ints and ints (the dispatcher may hand
    the op other sequences and int-likes)."""
    return [list(v) if isinstance(v, (list, tuple)) else int(v) for v in geometry]


def _register(layer: _Layer):
    return register(layer.op, (*_INPUTS, *layer.geometry, *_OBJECTIVE),
                    check=functools.partial(_check, layer), run=functools.partial(_run, layer),
                    allocate=_allocate, returns=List[Tensor], outs=_OUTS,
                    optional=layer.optional,
                    why_not_differentiable=layer.why_not_differentiable)


def _call(layer: _Layer, registered, x, weight, bias, target, activation, geometry: tuple,
          scale, anchor_weight, anchor_bias, eta, backend, precision, out,
          anchor_preact=None):
    """The public function of either layer type: Python-side checks, then the op (``out=``:
    the ``_out`` op, after refusing tensors that require grad in grad mode). The optional
    parameters are passed only when given (the schema's default otherwise)."""
    op = layer.op
    check_call_types(op, tensors=[("x", x), ("weight", weight), ("target", target)],
                     optional_tensors=[("bias", bias), ("anchor_weight", anchor_weight),
                                       ("anchor_bias", anchor_bias),
                                       ("anchor_preact", anchor_preact)],
                     numbers=[("scale", scale)], optional_numbers=[("eta", eta)],
                     strings=[("activation", activation), ("precision", precision)])
    geometry = layer.check_geometry(op, *geometry)
    backend = backend_arg(op, backend)
    scale, eta = float(scale), (None if eta is None else float(eta))
    args = (x, weight, bias, target, activation, *geometry, scale, anchor_weight,
            anchor_bias, eta, backend, precision)
    optional = () if anchor_preact is None else (anchor_preact,)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail_type(op, "out", "a pair (grad_weight, grad_bias)", type(out).__name__)
        check_call_types(op, tensors=[("out_weight", out[0])],
                         optional_tensors=[("out_bias", out[1])])
        refuse_in_place_autograd(
            op, "out=(grad_weight, grad_bias)",
            dict(x=x, weight=weight, bias=bias, target=target, anchor_weight=anchor_weight,
                 anchor_bias=anchor_bias, anchor_preact=anchor_preact, out_weight=out[0],
                 out_bias=out[1]),
            "; without out= it accepts such inputs (a backward pass through its result then "
            "raises)")
        registered.out_op(*args, out[0], out[1], *optional)
        return out[0], out[1]
    gw, gb = registered.op(*args, *optional)
    return gw, (gb if bias is not None else None)


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
    ``anchor_weight``, ``anchor_bias``: the delta form of stage 1 (Linear only; see
    ``matched_loss_grad``), W0 and b0 read at every call (they may change in place too).

    For loops that repeat one checked call on the same tensor objects whose values change in
    place (the per-layer inner iterations t >= 2 of ``lk.optim.LocoProp``): for a small layer
    the checks and the ``torch.library`` dispatch cost more than the kernel. Never change the
    tensors' shapes, dtypes or devices between calls: nothing in ``again`` would catch it."""
    layer, registered = (_LINEAR, _LINEAR_OPS) if conv2d is None else (_CONV2D, _CONV2D_OPS)
    if conv2d is not None and anchor_preact is not None:
        fail_value(layer.op, "anchor_preact", "None (the Conv2d op has no delta form yet)",
                   "a tensor")
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
                           "in W and b, in closed form)", optional=_LINEAR_OPTIONAL)
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
                           "matched loss in W and b, in closed form)")
_CONV2D_OPS = _register(_CONV2D)
_matched_loss_grad_conv2d_op = _CONV2D_OPS.op
_matched_loss_grad_conv2d_out_op = _CONV2D_OPS.out_op


def matched_loss_grad_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             target: Tensor, activation: str, *, stride=1, padding=0,
                             dilation=1, groups: int = 1, scale: float = 1.0,
                             anchor_weight: Optional[Tensor] = None,
                             anchor_bias: Optional[Tensor] = None, eta: Optional[float] = None,
                             backend: Optional[str] = None, precision: str = "ieee",
                             out: Optional[tuple] = None):
    """Gradient of a Conv2d+f layer's local LocoProp objective in (W, b).

    The layer is ``nn.Conv2d`` (any stride, padding, dilation, groups; depthwise included):
    X (N, C_in, H, W), W (C_out, C_in/groups, kh, kw), b (C_out,) or None, and
    Z = conv2d(X, W) + b (N, C_out, H_out, W_out). It is docs/design.md section 2 with one row
    per output position (n, h, w) and one column per channel:

        targets    Y = f(Z0) - gamma G  (variant M; G = dL/dZ, f over the channels)
                   Y = Z0 - gamma G     (variant S, with f = identity)
        objective  scale * sum_{n,h,w} [F(z[n,:,h,w]) - y[n,:,h,w] . z[n,:,h,w]]
                   [+ ||(W, b) - (W0, b0)||^2 / (2 eta)],  F the potential of the table
        D      = f(conv2d(X, W) + b) - Y                           (N, C_out, H_out, W_out)
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
            without anchor_weight (anchor_bias when bias is given), anchor_bias without bias,
            out_bias given exactly when bias is not, ``out`` overlapping an input, or a
            backend that cannot run here.
        RuntimeError: with ``out=``, when grad mode is on and any tensor argument requires
            grad; without ``out=``, when a backward pass reaches the returned gradients
            ("locoprop.matched_loss_grad_conv2d is not differentiable: ...").
    """
    return _call(_CONV2D, _CONV2D_OPS, x, weight, bias, target, activation,
                 (stride, padding, dilation, groups), scale,
                 anchor_weight, anchor_bias, eta, backend, precision, out)
