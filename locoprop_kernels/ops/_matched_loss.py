"""What the matched-loss ops of every layer type share (``matched_loss.py``: Linear,
``matched_loss_conv2d.py``: Conv2d).

Both are docs/design.md section 2's gradient (D = f(Z) - Y against X, plus the prox term), the
rows being the batch (Linear) or the output positions (Conv2d). They share all but one
``_Layer`` each (its geometry, the shapes of x and weight, its backend method): the checks of
bias, target, scale, prox and ``out=``, the backend call, the outputs and the public path.

    locoprop::matched_loss_grad[_conv2d]       returns [grad_weight, grad_bias]; grad_bias is
                                               empty when bias is None (a Tensor[] holds no None)
    locoprop::matched_loss_grad[_conv2d]_out   writes into out_weight / out_bias (arena slices)

Both take one more argument, last and defaulting to None: ``anchor_preact`` Z0, the delta form
of stage 1 (``matched_loss_grad``'s and ``matched_loss_grad_conv2d``'s docstrings).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .. import backends
from ..activations import get_activation
from ..validation import (check_call_types, check_choice, check_no_overlap,
                          check_number, check_operand_dtype, check_tensor, fail_type,
                          fail_value)
from ._checks import backend_arg, check_backend_dtype, refuse_in_place_autograd
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
#: Both layer types have them (Linear and Conv2d: the delta form's Z0).
_OPTIONAL = (("anchor_preact", Optional[Tensor]),)


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
    #: The delta form's pre-activation in the layer's terms, for messages
    #: ("Z0 + X (W - W0)^T + (b - b0)").
    delta_form: str
    #: Its parameters with a default of None, last in the schema (``_OPTIONAL``); the
    #: ones of ``_OPTIONAL_NAMES`` it lacks are None in ``_split``.
    optional: Params = ()


#: Every optional parameter a layer type may have, in the order ``_split`` returns them.
_OPTIONAL_NAMES = ("anchor_preact",)


def _check_scale_prox_out(op, delta_form, x, weight, bias, target, scale, anchor_weight,
                          anchor_bias, eta, precision, anchor_preact, out_weight, out_bias):
    """The arguments both matched-loss gradients (Linear, Conv2d) share: scale, precision, the
    prox term (eta, W0, b0: weight's and bias's shapes), the anchored pre-activation Z0
    (target's shape and dtype rule; it needs W0, and b0 with a bias; ``delta_form``: the
    layer's Z = ... for messages) and ``out=`` (no overlap with inputs)."""
    check_number(op, "scale", scale)
    check_choice(op, "precision", precision, PRECISIONS)
    if anchor_preact is not None:
        if anchor_weight is None:
            fail_value(op, "anchor_weight", f"a tensor when anchor_preact is given (the W0 of "
                       f"Z = {delta_form})", None)
        if bias is not None and anchor_bias is None:
            fail_value(op, "anchor_bias", f"a tensor when anchor_preact is given and bias is "
                       f"not None (the b0 of Z = {delta_form})", None)
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
    _check_scale_prox_out(op, layer.delta_form, x, weight, bias, target, scale, anchor_weight,
                          anchor_bias, eta, precision, anchor_preact, out_weight, out_bias)


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
