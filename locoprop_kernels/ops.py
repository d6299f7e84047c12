"""The op layer: DESIGN.md section 4's functions as ``torch.library`` custom ops.

Each public function packs its arguments and calls a custom op in the ``locoprop`` namespace.
The op's real implementation validates everything (shapes, dtypes, devices, names, aliasing,
empty batches) before any write, then dispatches to a backend (``backends/``). Its
``register_fake`` twin runs the same shape checks and describes the outputs, so the ops work
under ``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.

Ops:
    locoprop::matched_loss_grad      functional, returns (grad_weight, grad_bias)
    locoprop::matched_loss_grad_out  writes into out_weight / out_bias (arena slices)
    locoprop::matched_loss_grad_conv2d      the same for a Conv2d layer, returns (grad_weight,
                                            grad_bias)
    locoprop::matched_loss_grad_conv2d_out  writes into out_weight / out_bias
    locoprop::local_targets          returns Y
    locoprop::rmsprop_step_          updates params, square_avgs, momentum_bufs in place
    locoprop::not_differentiable     the backward of the functional ops: raises (see below)

Dtypes of the matched-loss ops (mixed precision, as ``torch.autocast`` records a layer):
the parameters -- weight, bias, anchor_weight, anchor_bias -- set the compute dtype and must
all have the weight's dtype. The operands x and target may each have that dtype or, when the
weight is float32 or float64, a lower-precision float (bfloat16 or float16). Nothing else
mixes: fp32 x with an fp64 weight, fp16 with bf16, integer tensors, and an operand more
precise than the weight (fp32 x with a bf16 weight: the error names the weight) are refused
with a TypeError. The math runs in the weight's dtype, fp32 for half storage (fp32 weight:
fp32 accumulation; the half operands are converted exactly), and the returned gradients have
the weight's dtype; ``out=`` buffers may be of any float dtype and receive that result
rounded once. So all-half calls (a model cast to bf16) keep half storage with fp32 math on
every backend, fp32 and mixed calls run on every backend, and an fp64 weight runs on the
reference backend (auto-selected; named, the cpp and triton backends refuse it).
``local_targets`` takes preact and grad_preact of one dtype (half ones included) and returns
Y in that dtype, computed in fp32 for half storage.

None of them is differentiable (DESIGN.md section 4: the trainer calls them on detached
tensors). The functional ops accept inputs that require grad and return correct values; their
autograd formula raises a RuntimeError naming the op if a backward pass reaches them. The
in-place ones (``out=``, ``rmsprop_step_``) cannot be recorded by autograd at all, so with grad
mode on they refuse, before any write, tensors that require grad, as torch's own ``out=``
functions do.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import torch
from torch.utils import _pytree as pytree

from . import backends
from .activations import get_activation
from .rmsprop_options import STYLES, RMSpropOptions
from .validation import (FLOAT_DTYPES, is_fake, check_call_types, check_choice, check_matrix,
                         check_no_overlap, check_number, check_operand_dtype, check_tensor,
                         fail_type, fail_value)

Tensor = torch.Tensor
PRECISIONS = ("ieee", "tf32")
VARIANTS = ("M", "S")


def _check_backend_dtype(op: str, backend, arg: str, t: Tensor) -> None:
    if t.dtype not in backend.dtypes:
        fail_type(op, arg, f"a dtype the '{backend.name}' backend supports "
                  f"{[str(d) for d in backend.dtypes]}", t.dtype)


def _check_backend_arg(op: str, backend) -> None:
    backends.check_name(op, backend)


def _autocast_off(device: torch.device):
    """A context with autocast off on ``device`` while a backend runs. A custom op has no
    autocast kernel of its own, so an op called under ``torch.autocast`` reaches its
    implementation with autocast still on, and the torch GEMMs and convolutions inside the
    backends (all of the reference's math, the cpp and conv paths' GEMMs) would run in the
    autocast dtype instead of the weight's. Nothing to do (no context entered) otherwise."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- autograd

#: Why each functional op has no derivative, for its error message.
_NOT_DIFFERENTIABLE = {
    "matched_loss_grad": "it computes a gradient itself (of the layer's local matched loss in W "
                         "and b, in closed form)",
    "matched_loss_grad_conv2d": "it computes a gradient itself (of the Conv2d layer's local "
                                "matched loss in W and b, in closed form)",
    "local_targets": "it forms the local problem's targets from a gradient, in closed form",
}


def _not_differentiable_message(op: str) -> str:
    return (f"locoprop.{op} is not differentiable: {_NOT_DIFFERENTIABLE[op]}, and it has no "
            f"autograd formula. Call it on detached tensors (x.detach()), or use "
            f"locoprop_kernels.reference.{op} (plain PyTorch) under autograd if you need "
            f"derivatives through it")


@torch.library.custom_op("locoprop::not_differentiable", mutates_args=())
def _not_differentiable_op(grad: Tensor, shape: List[int], dtype: torch.dtype,
                           op: str) -> Tensor:
    """The gradient of one input of ``op``, which has none: raises. An op (not a plain raise in
    the backward formula) so that tracing a backward graph under torch.compile (AOTAutograd
    traces it whenever an input requires grad) succeeds, and the error comes when the
    backward runs, as in eager."""
    raise RuntimeError(_not_differentiable_message(op))


@_not_differentiable_op.register_fake
def _(grad, shape, dtype, op):
    return grad.new_empty(shape, dtype=dtype)


def _register_no_derivative(custom_op, op: str) -> None:
    """The autograd formula of a functional op without a derivative: the forward runs (on
    inputs that require grad too, returning the same values and outputs with a grad_fn); a
    backward pass through it raises a RuntimeError naming the op. Only input shapes and dtypes
    are kept for the backward, no tensors."""

    def setup_context(ctx, inputs, output):
        ctx.input_meta = [(tuple(t.shape), t.dtype) if isinstance(t, Tensor) else None
                          for t in inputs]

    def backward(ctx, *grads):
        # One gradient per output (a list of them for matched_loss_grad's List[Tensor]).
        grad = next(g for g in pytree.tree_leaves(grads) if isinstance(g, Tensor))
        return tuple(_not_differentiable_op(grad, list(meta[0]), meta[1], op)
                     if meta is not None and needed else None
                     for meta, needed in zip(ctx.input_meta, ctx.needs_input_grad))

    custom_op.register_autograd(backward, setup_context=setup_context)


def _any_requires_grad_py(*values) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad
               for v in values for t in (v if isinstance(v, list) else (v,)))


# Tensors and lists of tensors, in C++ (torch's custom-op autograd layer asks the same): eager
# rmsprop_step_ asks it of every tensor at every step in grad mode. Dynamo cannot trace it.
_any_requires_grad_c = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)


def _refuse_in_place_autograd(op: str, writes: str, args: dict, hint: str = "") -> None:
    """Grad mode on and a tensor argument that requires grad: an in-place op has nothing to
    hang an autograd node on (torch's own ``out=`` functions refuse this too); say so, naming
    the argument, before anything is written. ``args``: name -> a Tensor, None or a list of
    Tensors (then named ``name[i]``)."""
    if not torch.is_grad_enabled():
        return
    any_requires_grad = (_any_requires_grad_py if torch.compiler.is_compiling()
                         else _any_requires_grad_c)
    if not any_requires_grad(*args.values()):
        return
    for name, value in args.items():
        for i, t in enumerate(value if isinstance(value, list) else (value,)):
            if isinstance(t, Tensor) and t.requires_grad:
                arg = f"{name}[{i}]" if isinstance(value, list) else name
                raise RuntimeError(
                    f"locoprop.{op} is not differentiable: it writes {writes} in place, which "
                    f"autograd cannot record, and argument '{arg}' requires grad while grad "
                    f"mode is on. Call it under torch.no_grad() or on detached tensors "
                    f"(t.detach() shares t's memory){hint}")


# ---------------------------------------------------------------- matched_loss_grad

def _check_scale_prox_out(op, x, weight, bias, target, scale, anchor_weight, anchor_bias, eta,
                          precision, out_weight, out_bias):
    """The arguments both matched-loss gradients (Linear, Conv2d) share: scale, precision, the
    prox term (eta, W0, b0: weight's and bias's shapes) and ``out=`` (no overlap with inputs)."""
    check_number(op, "scale", scale)
    check_choice(op, "precision", precision, PRECISIONS)
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
                               ("anchor_weight", anchor_weight), ("anchor_bias", anchor_bias)])


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


def _check_matched_loss_grad(op, x, weight, bias, target, activation, scale, anchor_weight,
                             anchor_bias, eta, precision, out_weight=None, out_bias=None):
    """Every argument of the matched-loss gradient, before anything is written."""
    get_activation(activation, op=f"locoprop.{op}")
    check_matrix(op, "x", x, rows_name="B", cols_name="d_in")
    B, d_in = x.shape
    check_tensor(op, "weight", weight, device=x.device)
    check_operand_dtype(op, "x", x, "weight", weight.dtype, blame_param=True)
    if weight.dim() != 2 or weight.shape[1] != d_in or weight.shape[0] == 0:
        fail_value(op, "weight", f"shape (d_out, d_in) with d_in = {d_in} and d_out >= 1",
                   tuple(weight.shape))
    d_out = weight.shape[0]
    _check_bias_target(op, x, weight, bias, target, (d_out,), (B, d_out), "(d_out,)",
                       "(B, d_out)")
    _check_scale_prox_out(op, x, weight, bias, target, scale, anchor_weight, anchor_bias, eta,
                          precision, out_weight, out_bias)


def _run_matched_loss_grad(op, x, weight, bias, target, activation, scale, anchor_weight,
                           anchor_bias, eta, backend, precision, out_weight, out_bias):
    be = backends.resolve(op, backend or None, x.device, weight.dtype,
                          activation=get_activation(activation))
    _check_backend_dtype(op, be, "x", x)
    _check_backend_dtype(op, be, "weight", weight)
    if eta is None:  # the prox centre is unused without eta: never read it
        anchor_weight = anchor_bias = None
    with _autocast_off(x.device):
        be.matched_loss_grad_into(x, weight, bias, target, activation, float(scale),
                                  anchor_weight, anchor_bias, eta, out_weight, out_bias,
                                  precision)


@torch.library.custom_op("locoprop::matched_loss_grad", mutates_args=())
def _matched_loss_grad_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                          activation: str, scale: float, anchor_weight: Optional[Tensor],
                          anchor_bias: Optional[Tensor], eta: Optional[float], backend: str,
                          precision: str) -> List[Tensor]:
    op = "matched_loss_grad"
    _check_matched_loss_grad(op, x, weight, bias, target, activation, scale, anchor_weight,
                             anchor_bias, eta, precision)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    gb = torch.empty((weight.shape[0] if bias is not None else 0,), dtype=weight.dtype,
                     device=weight.device)
    _run_matched_loss_grad(op, x, weight, bias, target, activation, scale, anchor_weight,
                           anchor_bias, eta, backend, precision, gw,
                           gb if bias is not None else None)
    return [gw, gb]


@_matched_loss_grad_op.register_fake
def _(x, weight, bias, target, activation, scale, anchor_weight, anchor_bias, eta, backend,
      precision):
    _check_matched_loss_grad("matched_loss_grad", x, weight, bias, target, activation, scale,
                             anchor_weight, anchor_bias, eta, precision)
    gb_len = weight.shape[0] if bias is not None else 0
    return [torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((gb_len,))]


_register_no_derivative(_matched_loss_grad_op, "matched_loss_grad")


@torch.library.custom_op("locoprop::matched_loss_grad_out",
                         mutates_args=("out_weight", "out_bias"))
def _matched_loss_grad_out_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                              target: Tensor, activation: str, scale: float,
                              anchor_weight: Optional[Tensor], anchor_bias: Optional[Tensor],
                              eta: Optional[float], backend: str, precision: str,
                              out_weight: Tensor, out_bias: Optional[Tensor]) -> None:
    op = "matched_loss_grad"
    _check_matched_loss_grad(op, x, weight, bias, target, activation, scale, anchor_weight,
                             anchor_bias, eta, precision, out_weight, out_bias)
    _run_matched_loss_grad(op, x, weight, bias, target, activation, scale, anchor_weight,
                           anchor_bias, eta, backend, precision, out_weight, out_bias)


@_matched_loss_grad_out_op.register_fake
def _(x, weight, bias, target, activation, scale, anchor_weight, anchor_bias, eta, backend,
      precision, out_weight, out_bias):
    _check_matched_loss_grad("matched_loss_grad", x, weight, bias, target, activation, scale,
                             anchor_weight, anchor_bias, eta, precision, out_weight, out_bias)


def matched_loss_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                      activation: str, *, scale: float = 1.0,
                      anchor_weight: Optional[Tensor] = None,
                      anchor_bias: Optional[Tensor] = None, eta: Optional[float] = None,
                      backend: Optional[str] = None, precision: str = "ieee",
                      out: Optional[tuple] = None):
    """Gradient of a Linear+f layer's local LocoProp objective in (W, b).

        D      = f(X W^T + b) - Y                     (B, d_out); softmax row-wise
        grad_W = scale * D^T X  [+ (W - W0) / eta]    (d_out, d_in)
        grad_b = scale * D.sum(0) [+ (b - b0) / eta]  (d_out,)

    x (B, d_in), weight (d_out, d_in), bias (d_out,) or None, target (B, d_out), all on one
    device. Dtypes (the module docstring): bias and the anchors have the weight's dtype; x
    and target the weight's dtype or, with an fp32/fp64 weight, bf16/fp16 (mixed precision:
    the inputs ``torch.autocast`` records for a layer with fp32 parameters); the math is in
    the weight's dtype (fp32 for half storage) and the gradients are returned in it. The prox
    term is on when ``eta`` is given (``anchor_weight`` / ``anchor_bias`` are W0 / b0).
    ``precision`` "ieee" or "tf32" picks the fp32 dot on the GPU (triton backend).
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
            eta without anchor_weight (anchor_bias when bias is given), anchor_bias without
            bias, out_bias given exactly when bias is not, ``out`` overlapping an input, or a
            backend that cannot run here ("cpp" without the extension, "triton" on CPU
            without TRITON_INTERPRET=1).
        RuntimeError: with ``out=``, when grad mode is on and any tensor argument requires
            grad (autograd cannot record a write into ``out``); without ``out=``, when a
            backward pass reaches the returned gradients
            ("locoprop.matched_loss_grad is not differentiable: ...").
    """
    op = "matched_loss_grad"
    check_call_types(op, tensors=[("x", x), ("weight", weight), ("target", target)],
                     optional_tensors=[("bias", bias), ("anchor_weight", anchor_weight),
                                       ("anchor_bias", anchor_bias)],
                     numbers=[("scale", scale)], optional_numbers=[("eta", eta)],
                     strings=[("activation", activation), ("precision", precision)])
    _check_backend_arg(op, backend)
    scale, eta = float(scale), (None if eta is None else float(eta))
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail_type(op, "out", "a pair (grad_weight, grad_bias)", type(out).__name__)
        check_call_types(op, tensors=[("out_weight", out[0])],
                         optional_tensors=[("out_bias", out[1])])
        _refuse_in_place_autograd(
            op, "out=(grad_weight, grad_bias)",
            dict(x=x, weight=weight, bias=bias, target=target, anchor_weight=anchor_weight,
                 anchor_bias=anchor_bias, out_weight=out[0], out_bias=out[1]),
            "; without out= it accepts such inputs (a backward pass through its result then "
            "raises)")
        _matched_loss_grad_out_op(x, weight, bias, target, activation, scale, anchor_weight,
                                  anchor_bias, eta, backend or "", precision, out[0], out[1])
        return out[0], out[1]
    gw, gb = _matched_loss_grad_op(x, weight, bias, target, activation, scale, anchor_weight,
                                   anchor_bias, eta, backend or "", precision)
    return gw, (gb if bias is not None else None)


# ---------------------------------------------------------------- matched_loss_grad_conv2d
#
# A Conv2d layer (DESIGN.md section 2 with one row per output position): X (N, C_in, H, W),
# W (C_out, C_in/groups, kh, kw), b (C_out,) or None, Z = conv2d(X, W) + b and the targets
# Y (N, C_out, H_out, W_out). The rows of section 2 are the N * H_out * W_out positions, its
# columns the C_out channels: f acts on every position's channel vector (softmax over dim 1)
# and the potential F is summed over channels and positions.

def _pair(op: str, arg: str, value, low: int) -> List[int]:
    """An int or a pair of ints, each >= low, as a list [h, w] (torch's conv2d arguments)."""
    values = list(value) if isinstance(value, (tuple, list)) else [value, value]
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        fail_type(op, arg, "an int or a pair of ints", repr(value))
    if min(values) < low:
        fail_value(op, arg, f"ints >= {low}", repr(value))
    return values


def _check_int(op: str, arg: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail_type(op, arg, "an int", type(value).__name__)
    if value < low:
        fail_value(op, arg, f"an int >= {low}", value)


def _conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_matched_loss_grad_conv2d(op, x, weight, bias, target, activation, stride, padding,
                                    dilation, groups, scale, anchor_weight, anchor_bias, eta,
                                    precision, out_weight=None, out_bias=None):
    """Every argument of the Conv2d matched-loss gradient, before anything is written."""
    get_activation(activation, op=f"locoprop.{op}")
    check_tensor(op, "x", x)
    if x.dim() != 4:
        fail_value(op, "x", "a 4-D tensor (N, C_in, H, W)", tuple(x.shape))
    if x.shape[0] == 0:
        fail_value(op, "x", "a non-empty batch (N >= 1)", tuple(x.shape))
    if min(x.shape[1:]) == 0:
        fail_value(op, "x", "C_in, H, W >= 1", tuple(x.shape))
    N, C_in, H, W = x.shape
    for arg, value, low in (("stride", stride, 1), ("padding", padding, 0),
                            ("dilation", dilation, 1)):
        _pair(op, arg, value, low)
    _check_int(op, "groups", groups, 1)
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
    _check_bias_target(op, x, weight, bias, target, (C_out,), (N, C_out, H_out, W_out),
                       "(C_out,)", "(N, C_out, H_out, W_out)")
    _check_scale_prox_out(op, x, weight, bias, target, scale, anchor_weight, anchor_bias, eta,
                          precision, out_weight, out_bias)


def _run_matched_loss_grad_conv2d(op, x, weight, bias, target, activation, stride, padding,
                                  dilation, groups, scale, anchor_weight, anchor_bias, eta,
                                  backend, precision, out_weight, out_bias):
    be = backends.resolve(op, backend or None, x.device, weight.dtype,
                          activation=get_activation(activation))
    _check_backend_dtype(op, be, "x", x)
    _check_backend_dtype(op, be, "weight", weight)
    if eta is None:  # the prox centre is unused without eta: never read it
        anchor_weight = anchor_bias = None
    with _autocast_off(x.device):
        be.matched_loss_grad_conv2d_into(x, weight, bias, target, activation, list(stride),
                                         list(padding), list(dilation), int(groups),
                                         float(scale), anchor_weight, anchor_bias, eta,
                                         out_weight, out_bias, precision)


@torch.library.custom_op("locoprop::matched_loss_grad_conv2d", mutates_args=())
def _matched_loss_grad_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                 target: Tensor, activation: str, stride: List[int],
                                 padding: List[int], dilation: List[int], groups: int,
                                 scale: float, anchor_weight: Optional[Tensor],
                                 anchor_bias: Optional[Tensor], eta: Optional[float],
                                 backend: str, precision: str) -> List[Tensor]:
    op = "matched_loss_grad_conv2d"
    args = (x, weight, bias, target, activation, stride, padding, dilation, groups, scale,
            anchor_weight, anchor_bias, eta)
    _check_matched_loss_grad_conv2d(op, *args, precision)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    gb = torch.empty((weight.shape[0] if bias is not None else 0,), dtype=weight.dtype,
                     device=weight.device)
    _run_matched_loss_grad_conv2d(op, *args, backend, precision, gw,
                                  gb if bias is not None else None)
    return [gw, gb]


@_matched_loss_grad_conv2d_op.register_fake
def _(x, weight, bias, target, activation, stride, padding, dilation, groups, scale,
      anchor_weight, anchor_bias, eta, backend, precision):
    _check_matched_loss_grad_conv2d("matched_loss_grad_conv2d", x, weight, bias, target,
                                    activation, stride, padding, dilation, groups, scale,
                                    anchor_weight, anchor_bias, eta, precision)
    gb_len = weight.shape[0] if bias is not None else 0
    return [torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((gb_len,))]


_register_no_derivative(_matched_loss_grad_conv2d_op, "matched_loss_grad_conv2d")


@torch.library.custom_op("locoprop::matched_loss_grad_conv2d_out",
                         mutates_args=("out_weight", "out_bias"))
def _matched_loss_grad_conv2d_out_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                     target: Tensor, activation: str, stride: List[int],
                                     padding: List[int], dilation: List[int], groups: int,
                                     scale: float, anchor_weight: Optional[Tensor],
                                     anchor_bias: Optional[Tensor], eta: Optional[float],
                                     backend: str, precision: str, out_weight: Tensor,
                                     out_bias: Optional[Tensor]) -> None:
    op = "matched_loss_grad_conv2d"
    args = (x, weight, bias, target, activation, stride, padding, dilation, groups, scale,
            anchor_weight, anchor_bias, eta)
    _check_matched_loss_grad_conv2d(op, *args, precision, out_weight, out_bias)
    _run_matched_loss_grad_conv2d(op, *args, backend, precision, out_weight, out_bias)


@_matched_loss_grad_conv2d_out_op.register_fake
def _(x, weight, bias, target, activation, stride, padding, dilation, groups, scale,
      anchor_weight, anchor_bias, eta, backend, precision, out_weight, out_bias):
    _check_matched_loss_grad_conv2d("matched_loss_grad_conv2d", x, weight, bias, target,
                                    activation, stride, padding, dilation, groups, scale,
                                    anchor_weight, anchor_bias, eta, precision, out_weight,
                                    out_bias)


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
    Z = conv2d(X, W) + b (N, C_out, H_out, W_out). It is DESIGN.md section 2 with one row
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
    op = "matched_loss_grad_conv2d"
    check_call_types(op, tensors=[("x", x), ("weight", weight), ("target", target)],
                     optional_tensors=[("bias", bias), ("anchor_weight", anchor_weight),
                                       ("anchor_bias", anchor_bias)],
                     numbers=[("scale", scale)], optional_numbers=[("eta", eta)],
                     strings=[("activation", activation), ("precision", precision)])
    stride, padding, dilation = (_pair(op, "stride", stride, 1),
                                 _pair(op, "padding", padding, 0),
                                 _pair(op, "dilation", dilation, 1))
    _check_int(op, "groups", groups, 1)
    _check_backend_arg(op, backend)
    scale, eta = float(scale), (None if eta is None else float(eta))
    args = (x, weight, bias, target, activation, stride, padding, dilation, groups, scale,
            anchor_weight, anchor_bias, eta, backend or "", precision)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail_type(op, "out", "a pair (grad_weight, grad_bias)", type(out).__name__)
        check_call_types(op, tensors=[("out_weight", out[0])],
                         optional_tensors=[("out_bias", out[1])])
        _refuse_in_place_autograd(
            op, "out=(grad_weight, grad_bias)",
            dict(x=x, weight=weight, bias=bias, target=target, anchor_weight=anchor_weight,
                 anchor_bias=anchor_bias, out_weight=out[0], out_bias=out[1]),
            "; without out= it accepts such inputs (a backward pass through its result then "
            "raises)")
        _matched_loss_grad_conv2d_out_op(*args, out[0], out[1])
        return out[0], out[1]
    gw, gb = _matched_loss_grad_conv2d_op(*args)
    return gw, (gb if bias is not None else None)


# ---------------------------------------------------------------- local_targets

def _check_local_targets(op, preact, grad_preact, activation, gamma, variant):
    get_activation(activation, op=f"locoprop.{op}")
    check_matrix(op, "preact", preact, rows_name="B", cols_name="d_out")
    check_tensor(op, "grad_preact", grad_preact, shape=tuple(preact.shape),
                 device=preact.device, dtype=preact.dtype, what=" (preact's shape and dtype)")
    check_number(op, "gamma", gamma)
    check_choice(op, "variant", variant, VARIANTS)


@torch.library.custom_op("locoprop::local_targets", mutates_args=())
def _local_targets_op(preact: Tensor, grad_preact: Tensor, activation: str, gamma: float,
                      variant: str, backend: str) -> Tensor:
    op = "local_targets"
    _check_local_targets(op, preact, grad_preact, activation, gamma, variant)
    be = backends.resolve(op, backend or None, preact.device, preact.dtype,
                          activation=get_activation("identity" if variant == "S"
                                                    else activation))
    _check_backend_dtype(op, be, "preact", preact)
    out = torch.empty_like(preact, memory_format=torch.contiguous_format)
    with _autocast_off(preact.device):
        be.local_targets_into(preact, grad_preact, activation, float(gamma), variant, out)
    return out


@_local_targets_op.register_fake
def _(preact, grad_preact, activation, gamma, variant, backend):
    _check_local_targets("local_targets", preact, grad_preact, activation, gamma, variant)
    return torch.empty_like(preact, memory_format=torch.contiguous_format)


_register_no_derivative(_local_targets_op, "local_targets")


def local_targets(preact: Tensor, grad_preact: Tensor, activation: str, gamma: float, *,
                  variant: str = "M", backend: Optional[str] = None) -> Tensor:
    """LocoProp targets from one forward/backward pass, (B, d_out) like ``preact``.

        variant "M": Y = f(Z) - gamma * G      variant "S": Y = Z - gamma * G

    preact Z and grad_preact G = dL/dZ (which already carries L's 1/B) are (B, d_out).

    Not differentiable: inputs that require grad are accepted and give the same values, but a
    backward pass through the result raises (see RuntimeError below).

    Raises, before anything is written (each message names the op and the argument):
        TypeError: preact / grad_preact not Tensors, grad_preact's dtype or device not
            preact's (or a dtype the backend does not support), gamma not a float/int,
            activation / variant not a str.
        ValueError: preact not 2-D or empty, grad_preact not preact's shape, a non-finite
            gamma, an unknown activation, variant or backend name, or a backend that cannot
            run here.
        RuntimeError: when a backward pass reaches the returned targets
            ("locoprop.local_targets is not differentiable: ...").
    """
    op = "local_targets"
    check_call_types(op, tensors=[("preact", preact), ("grad_preact", grad_preact)],
                     numbers=[("gamma", gamma)], strings=[("activation", activation),
                                                          ("variant", variant)])
    _check_backend_arg(op, backend)
    gamma = float(gamma)
    return _local_targets_op(preact, grad_preact, activation, gamma, variant, backend or "")


# ---------------------------------------------------------------- rmsprop_step_

def _check_lr(op, lr, params):
    """lr: a one-element CPU tensor (a value), or a one-element fp32 tensor on the params'
    device (read there by the backends that can, without a host sync)."""
    check_tensor(op, "lr", lr, what=" (a one-element tensor)")
    if lr.numel() != 1:
        fail_value(op, "lr", "a one-element tensor", f"shape {tuple(lr.shape)}")
    device = params[0].device if params and isinstance(params[0], Tensor) else None
    if lr.device.type != "cpu" and device is not None:
        check_tensor(op, "lr", lr, device=device, dtype=torch.float32,
                     what=" (a CPU scalar or an fp32 tensor on the params' device)")
    if lr.device.type == "cpu" and not is_fake(lr):
        check_number(op, "lr", float(lr), low=0.0)


def _check_rmsprop(op, params, grads, square_avgs, momentum_bufs, grad_avgs, lr, options):
    options.check(op)
    if len(params) == 0:
        fail_value(op, "params", "at least one tensor", "an empty list")
    _check_lr(op, lr, params)
    for arg, ts in (("grads", grads), ("square_avgs", square_avgs)):
        if len(ts) != len(params):
            fail_value(op, arg, f"{len(params)} tensors (one per param)", len(ts))
    for arg, ts, used, when in (("momentum_bufs", momentum_bufs, options.has_momentum,
                                 "momentum != 0"),
                                ("grad_avgs", grad_avgs, options.centered, "centered")):
        if len(ts) not in (0, len(params)):
            fail_value(op, arg, f"None or {len(params)} tensors (one per param)", len(ts))
        if used and not ts:
            fail_value(op, arg, f"tensors when {when}", None)
    check_tensor(op, "params[0]", params[0])
    device = params[0].device
    float_dtypes = FLOAT_DTYPES
    named = []
    for i, p in enumerate(params):
        # The common case in plain attribute compares (this loop runs over every tensor of a
        # model each optimizer step); check_tensor then names what is wrong.
        shape, state_dtype = p.shape, (torch.float64 if p.dtype == torch.float64
                                       else torch.float32)
        g = grads[i]
        if not (isinstance(p, Tensor) and p.device == device and p.dtype in float_dtypes):
            check_tensor(op, f"params[{i}]", p, device=device)
        if not (isinstance(g, Tensor) and g.device == device and g.shape == shape
                and (g.dtype == p.dtype or g.dtype == torch.float32)):
            check_tensor(op, f"grads[{i}]", g, shape=tuple(shape), device=device,
                         dtypes=(p.dtype, torch.float32), what=" (params' shape)")
        named.append((("params", i), p))
        for arg, ts, used in (("square_avgs", square_avgs, True),
                              ("momentum_bufs", momentum_bufs, options.has_momentum),
                              ("grad_avgs", grad_avgs, options.centered)):
            if not used:
                continue
            t = ts[i]
            if not (isinstance(t, Tensor) and t.device == device and t.shape == shape
                    and t.dtype == state_dtype):
                check_tensor(op, f"{arg}[{i}]", t, shape=tuple(shape), device=device,
                             dtypes=(state_dtype,), what=" (params' shape)")
            named.append(((arg, i), t))
    # Written tensors must not overlap each other nor the gradients they read.
    check_no_overlap(op, written=named, read=[(("grads", i), g) for i, g in enumerate(grads)])


def _options(style, alpha, eps, weight_decay, momentum, centered, maximize) -> RMSpropOptions:
    return RMSpropOptions(style=style, alpha=alpha, eps=eps, weight_decay=weight_decay,
                          momentum=momentum, centered=centered, maximize=maximize)


def _rmsprop_step_impl(params: List[Tensor], grads: List[Tensor], square_avgs: List[Tensor],
                       momentum_bufs: List[Tensor], grad_avgs: List[Tensor], lr: Tensor,
                       style: str, alpha: float, eps: float, weight_decay: float,
                       momentum: float, centered: bool, maximize: bool, backend: str) -> None:
    op = "rmsprop_step_"
    options = _options(style, alpha, eps, weight_decay, momentum, centered, maximize)
    _check_rmsprop(op, params, grads, square_avgs, momentum_bufs, grad_avgs, lr, options)
    be = backends.resolve(op, backend or None, params[0].device, params[0].dtype)
    for i, p in enumerate(params):
        _check_backend_dtype(op, be, f"params[{i}]", p)
    if lr.device.type == "cpu":
        lr_arg = float(lr)              # a value: no device memory, no sync
    elif be.reads_lr_from_device:
        lr_arg = lr                     # read by the kernel: CUDA-graph safe, no sync
    else:
        lr_arg = float(lr.item())       # this backend takes a host value: one sync
    be.rmsprop_step_(list(params), list(grads), list(square_avgs), list(momentum_bufs),
                     list(grad_avgs), lr_arg, options)


_rmsprop_step_op = torch.library.custom_op(
    "locoprop::rmsprop_step_", mutates_args=("params", "square_avgs", "momentum_bufs",
                                             "grad_avgs"))(_rmsprop_step_impl)


@_rmsprop_step_op.register_fake
def _(params, grads, square_avgs, momentum_bufs, grad_avgs, lr, style, alpha, eps,
      weight_decay, momentum, centered, maximize, backend):
    options = _options(style, alpha, eps, weight_decay, momentum, centered, maximize)
    _check_rmsprop("rmsprop_step_", params, grads, square_avgs, momentum_bufs, grad_avgs, lr,
                   options)


TensorOrList = Union[Tensor, Sequence[Tensor]]
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain_eager(tensor_lists) -> bool:
    """Whether a call may skip the dispatcher: not compiling or tracing, no torch function or
    dispatch mode active, only plain tensors. (Nothing autograd would record: a tensor that
    requires grad in grad mode was refused before.)"""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()):
        return False
    for ts in tensor_lists:
        for t in ts:
            if type(t) not in _PLAIN_TYPES:
                return False
    return True


def _bump_versions(tensors: list) -> None:
    """Autograd's version counters of tensors written in place (as a custom op does)."""
    try:
        torch._C._increment_version(tensors)  # a list in one call (newer torch)
    except TypeError:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _as_list(op: str, arg: str, value) -> list:
    if value is None:
        return []
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    fail_type(op, arg, "a Tensor or a list of Tensors", type(value).__name__)


def rmsprop_step_(params: TensorOrList, grads: TensorOrList, square_avgs: TensorOrList,
                  momentum_bufs: Optional[TensorOrList] = None, *, lr: Union[float, Tensor],
                  alpha: float = 0.9, eps: float = 1e-5, momentum: float = 0.999,
                  style: str = "tf", weight_decay: float = 0.0, centered: bool = False,
                  maximize: bool = False, grad_avgs: Optional[TensorOrList] = None,
                  backend: Optional[str] = None) -> None:
    """One RMSProp step on every tensor, in place; one kernel launch for all of them.

        g  = -g if maximize;  g = g + weight_decay p  if weight_decay != 0
        ms = alpha ms + (1 - alpha) g^2
        v  = ms - ga^2, ga = lerp(ga, g, 1 - alpha)  if centered, else v = ms
        style "tf" (TF1, the official LocoProp code; ``square_avgs`` start at 1):
            d = lr g / sqrt(v + eps);  momentum != 0: buf = momentum buf + d, d = buf;  p -= d
        style "torch" (``torch.optim.RMSprop``; ``square_avgs`` start at 0):
            d = g / (sqrt(v) + eps);   momentum != 0: buf = momentum buf + d, d = buf;  p -= lr d

    Each tensor argument is a Tensor (e.g. a flat arena) or a list of Tensors of matching
    shapes. ``momentum_bufs`` is needed when momentum != 0 and ``grad_avgs`` when centered
    (else they may be None). ``lr`` is a float, a one-element CPU tensor, or a one-element
    fp32 tensor on the params' device; the triton and reference backends read the latter
    without a host sync (a captured CUDA graph then picks up its current value at every
    replay), the cpp backend reads it with ``.item()``. A CUDA graph can capture the triton
    step: one tensor per argument (an arena, as ``LocoProp`` uses) needs no table; the list
    form keeps device copies of its address tables by content, so a capture after one eager
    call over the same tensors copies nothing from the host (not yet run on a GPU). Params fp32/bf16/fp16 (fp64 on the reference backend), grads the params' dtype or
    fp32, state fp32 (fp64 for fp64 params).

    Not differentiable: it writes in place, which autograd cannot record. Call it under
    ``torch.no_grad()`` (as optimizers do) or on detached tensors.

    Raises, before anything is written (each message names the op and the argument):
        TypeError: an argument that is not a Tensor or a list of Tensors, a dtype or device
            that does not fit (or that the backend does not support), a number that is not a
            float/int, a flag that is not a bool, style not a str.
        ValueError: mismatched lengths or shapes, an empty params list, an option out of
            range (lr < 0, alpha, eps, momentum, weight_decay), an unknown style or backend
            name, a state list missing for the options (momentum_bufs when momentum != 0,
            grad_avgs when centered), aliasing between written tensors or with the grads, or
            a backend that cannot run here.
        RuntimeError: when grad mode is on and any tensor argument (params, grads, state,
            a tensor lr) requires grad ("locoprop.rmsprop_step_ is not differentiable: ...").
    """
    op = "rmsprop_step_"
    lists = {name: _as_list(op, name, value) for name, value in (
        ("params", params), ("grads", grads), ("square_avgs", square_avgs),
        ("momentum_bufs", momentum_bufs), ("grad_avgs", grad_avgs))}
    check_call_types(op, tensors=[(f"{name}[{i}]", t) for name, ts in lists.items()
                                  for i, t in enumerate(ts)],
                     numbers=[("alpha", alpha), ("eps", eps), ("momentum", momentum),
                              ("weight_decay", weight_decay)],
                     strings=[("style", style)])
    _check_backend_arg(op, backend)
    _refuse_in_place_autograd(op, "params, square_avgs, momentum_bufs and grad_avgs",
                              {**lists, "lr": lr},
                              "; torch.optim's optimizers step under torch.no_grad() too")
    if not isinstance(lr, Tensor):
        check_number(op, "lr", lr, low=0.0)
        # float64 holds the Python float exactly (fp64 params see the same lr as torch's).
        lr = torch.tensor(float(lr), dtype=torch.float64)
    args = (*lists.values(), lr, style, float(alpha), float(eps), float(weight_decay),
            float(momentum), centered, maximize, backend or "")
    if _plain_eager(lists.values()):
        # The dispatcher's custom-op machinery (argument flattening, autograd wrapper, version
        # bumps) costs more than the validation and the kernel of a small step; with nothing
        # for it to do (eager, no mode, plain tensors, no autograd) the implementation runs
        # directly and the written tensors' versions are bumped as the op would.
        _rmsprop_step_impl(*args)
        _bump_versions([t for name in ("params", "square_avgs", "momentum_bufs", "grad_avgs")
                        for t in lists[name]])
    else:
        _rmsprop_step_op(*args)


__all__ = ["matched_loss_grad", "matched_loss_grad_conv2d", "local_targets", "rmsprop_step_"]
