"""One multi-tensor RMSProp step in place: ``locoprop::rmsprop_step_`` (the update itself is
``rmsprop_options``'s module docstring). It writes params, square_avgs, momentum_bufs and
grad_avgs, so it has no autograd formula: with grad mode on, the public function refuses
tensors that require grad before any write, as torch's own ``out=`` functions do.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .. import backends
from ..rmsprop_options import DEFAULTS, RMSpropOptions
from ..validation import (FLOAT_DTYPES, check_call_types, check_no_overlap, check_number,
                          check_tensor, fail_type, fail_value, is_fake)
from ._checks import backend_arg, check_backend_dtype, refuse_in_place_autograd
from ._registry import register

Tensor = torch.Tensor
_OP = "rmsprop_step_"

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


def _check(params, grads, square_avgs, momentum_bufs, grad_avgs, lr, style, alpha, eps,
           weight_decay, momentum, centered, maximize, backend):
    """Every argument, before anything is written."""
    options = RMSpropOptions(style, alpha, eps, weight_decay, momentum, centered, maximize)
    _check_rmsprop(_OP, params, grads, square_avgs, momentum_bufs, grad_avgs, lr, options)


def _run(params, grads, square_avgs, momentum_bufs, grad_avgs, lr, style, alpha, eps,
         weight_decay, momentum, centered, maximize, backend):
    options = RMSpropOptions(style, alpha, eps, weight_decay, momentum, centered, maximize)
    be = backends.resolve(_OP, backend, params[0].device, params[0].dtype)
    for i, p in enumerate(params):
        check_backend_dtype(_OP, be, f"params[{i}]", p)
    be.rmsprop_step_(list(params), list(grads), list(square_avgs), list(momentum_bufs),
                     list(grad_avgs), _lr_arg(be, lr), options)


def _lr_arg(be, lr):
    """The lr as ``be`` takes it: a float stays; a CPU tensor becomes a value (no device
    memory, no sync); a device tensor stays for a backend that reads it there (CUDA-graph
    safe, no sync), else it is fetched once (one sync)."""
    if not isinstance(lr, Tensor):
        return lr
    if lr.device.type == "cpu":
        return float(lr)
    return lr if be.reads_lr_from_device else float(lr.item())


def rmsprop_step_checked_again_(params: List[Tensor], grads: List[Tensor],
                                square_avgs: List[Tensor], momentum_bufs: List[Tensor],
                                grad_avgs: List[Tensor], lr, options: RMSpropOptions,
                                backend: Optional[str]) -> None:
    """One more step with the tensors, options and backend of an ``rmsprop_step_`` call that
    was checked and ran already: the kernel only, no validation.

    For loops that repeat one checked call on the same tensor objects (LocoProp's inner
    iterations t >= 1 after t = 0's ``rmsprop_step_``): re-checking 2 x 161 tensors for
    overlap and dtypes costs milliseconds per iteration, the kernel microseconds. ``lr`` is a
    float, or a one-element tensor on the parameters' device (read there by a backend that
    can, else fetched once). Versions are bumped as the op would. Never call it with tensors
    ``rmsprop_step_`` has not seen: nothing here would catch a mismatch."""
    be = backends.resolve(_OP, backend, params[0].device, params[0].dtype)
    be.rmsprop_step_(params, grads, square_avgs, momentum_bufs, grad_avgs, _lr_arg(be, lr),
                     options)
    _bump_versions([*params, *square_avgs, *momentum_bufs, *grad_avgs])


_WRITTEN = ("params", "square_avgs", "momentum_bufs", "grad_avgs")
_RMSPROP_STEP = register(
    _OP, (("params", List[Tensor]), ("grads", List[Tensor]), ("square_avgs", List[Tensor]),
          ("momentum_bufs", List[Tensor]), ("grad_avgs", List[Tensor]), ("lr", Tensor),
          ("style", str), ("alpha", float), ("eps", float), ("weight_decay", float),
          ("momentum", float), ("centered", bool), ("maximize", bool), ("backend", str)),
    check=_check, run=_run, mutates=_WRITTEN)
_rmsprop_step_op, _rmsprop_step_impl = _RMSPROP_STEP.op, _RMSPROP_STEP.impl


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
                  alpha: float = DEFAULTS["tf"].alpha, eps: float = DEFAULTS["tf"].eps,
                  momentum: float = DEFAULTS["tf"].momentum, style: str = "tf",
                  weight_decay: float = 0.0, centered: bool = False,
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
    op = _OP
    lists = {name: _as_list(op, name, value) for name, value in (
        ("params", params), ("grads", grads), ("square_avgs", square_avgs),
        ("momentum_bufs", momentum_bufs), ("grad_avgs", grad_avgs))}
    check_call_types(op, tensors=[(f"{name}[{i}]", t) for name, ts in lists.items()
                                  for i, t in enumerate(ts)],
                     numbers=[("alpha", alpha), ("eps", eps), ("momentum", momentum),
                              ("weight_decay", weight_decay)],
                     strings=[("style", style)])
    backend = backend_arg(op, backend)
    refuse_in_place_autograd(op, "params, square_avgs, momentum_bufs and grad_avgs",
                             {**lists, "lr": lr},
                             "; torch.optim's optimizers step under torch.no_grad() too")
    if not isinstance(lr, Tensor):
        check_number(op, "lr", lr, low=0.0)
        # float64 holds the Python float exactly (fp64 params see the same lr as torch's).
        lr = torch.tensor(float(lr), dtype=torch.float64)
    args = (*lists.values(), lr, style, float(alpha), float(eps), float(weight_decay),
            float(momentum), centered, maximize, backend)
    if _plain_eager(lists.values()):
        # The dispatcher's custom-op machinery (argument flattening, autograd wrapper, version
        # bumps) costs more than the validation and the kernel of a small step; with nothing
        # for it to do (eager, no mode, plain tensors, no autograd) the implementation runs
        # directly and the written tensors' versions are bumped as the op would.
        _rmsprop_step_impl(*args)
        _bump_versions([t for name in _WRITTEN for t in lists[name]])
    else:
        _rmsprop_step_op(*args)

