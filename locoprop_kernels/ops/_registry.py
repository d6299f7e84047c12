"""The one way an op of this package becomes a ``torch.library`` custom op: ``register``.

Every op is three pieces of plain Python, called with the op's arguments in schema order
(positionally: the ops' host cost is per call, and keyword passing would add to it):

    check(*args)              every validation, before anything is written; also the fake
    allocate(*args)           the functional op's outputs, empty (real and fake tensors alike)
    run(*args, *outputs)      resolves a backend and writes into the outputs

From them ``register`` builds ``locoprop::<name>`` (functional: check, allocate, run, return
the outputs; its fake: check, allocate) and, for an op with ``outs``,
``locoprop::<name>_out`` (check and run into the caller's tensors; its fake: check). An op
without outputs writes its inputs in place (``mutates``): check and run; its fake: check. The
schemas are inferred by ``torch.library`` from the parameter lists, as from an annotated
function, so every op states its schema once, as a table of (name, type) pairs.

None of the ops is differentiable (the trainer calls them on detached tensors). A functional op
registered with ``why_not_differentiable`` accepts inputs that require grad and returns
correct values, but its autograd formula raises a RuntimeError naming the op when a backward
pass reaches it (``locoprop::not_differentiable``, below).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

Tensor = torch.Tensor
#: An op's parameters in schema order: (name, type annotation) pairs.
Params = Sequence[Tuple[str, object]]


def autocast_off(device: torch.device):
    """A context with autocast off on ``device`` while a backend runs. A custom op has no
    autocast kernel of its own, so an op called under ``torch.autocast`` reaches its
    implementation with autocast still on, and the torch GEMMs and convolutions inside the
    backends (all of the reference's math, the cpp and conv paths' GEMMs) would run in the
    autocast dtype instead of the weight's. Nothing to do (no context entered) otherwise."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- no derivative

#: Why each functional op has no derivative, for its error message (filled by ``register``).
_NOT_DIFFERENTIABLE: dict = {}


def _not_differentiable_message(op: str) -> str:
    return (f"locoprop.{op} is not differentiable: {_NOT_DIFFERENTIABLE[op]}, and it has no "
            f"autograd formula. Call it on detached tensors (x.detach()), or use "
            f"locoprop_kernels.reference.{op} (plain PyTorch) under autograd if you need "
            f"derivatives through it")


@torch.library.custom_op("locoprop::not_differentiable", mutates_args=())
def not_differentiable_op(grad: Tensor, shape: List[int], dtype: torch.dtype,
                          op: str) -> Tensor:
    """The gradient of one input of ``op``, which has none: raises. An op (not a plain raise in
    the backward formula) so that tracing a backward graph under torch.compile (AOTAutograd
    traces it whenever an input requires grad) succeeds, and the error comes when the
    backward runs, as in eager."""
    raise RuntimeError(_not_differentiable_message(op))


@not_differentiable_op.register_fake
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
        # One gradient per output (a list of them for an op returning List[Tensor]).
        grad = next(g for g in pytree.tree_leaves(grads) if isinstance(g, Tensor))
        return tuple(not_differentiable_op(grad, list(meta[0]), meta[1], op)
                     if meta is not None and needed else None
                     for meta, needed in zip(ctx.input_meta, ctx.needs_input_grad))

    custom_op.register_autograd(backward, setup_context=setup_context)


# ---------------------------------------------------------------- register

@dataclass(frozen=True)
class RegisteredOp:
    """What ``register`` made of one op."""

    #: ``locoprop::<name>``: the functional op, or the in-place one when it has no outputs.
    op: Callable
    #: ``locoprop::<name>_out`` (writes into its trailing ``out`` parameters), or None.
    out_op: Optional[Callable]
    #: ``op``'s implementation as a plain function of the positional arguments, for callers
    #: that may skip the dispatcher (nothing for it to do: eager, plain tensors, no autograd).
    impl: Callable


def _with_signature(fn: Callable, params: Params, returns, optional: Params = ()) -> Callable:
    """``fn(*args)``, declared as ``params, optional -> returns``, each of ``optional`` with
    the default None: ``torch.library`` infers the op's schema from that signature as from an
    annotated function. The schemas have no keyword-only arguments, so the dispatcher passes
    every argument positionally (the trailing defaulted ones only when the caller gave them:
    ``_canonical`` fills them in)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, annotation=t) for n, t in params]
        + [inspect.Parameter(n, kind, annotation=t, default=None) for n, t in optional],
        return_annotation=returns)
    return fn


def _canonical(fn: Callable, n_params: int, n_optional: int, n_outs: int) -> Callable:
    """``g(*schema_args)`` calling ``fn`` with the arguments in the canonical order
    (params, optional, outs): the optional parameters filled with None where the caller left
    them out, and moved before the outputs of an ``_out`` op (whose schema has them last, so
    that positional calls written before they existed still bind)."""
    if n_optional == 0:
        return fn

    def g(*args):
        given = args[n_params + n_outs:]
        optional = (*given, *([None] * (n_optional - len(given))))
        return fn(*args[:n_params], *optional, *args[n_params:n_params + n_outs])
    return g


def _checked(check: Callable, run: Optional[Callable]) -> Callable:
    """``f(*args)``: check, then run (None: check only, a fake that returns nothing)."""
    def f(*args):
        check(*args)
        if run is not None:
            run(*args)
    return f


def register(name: str, params: Params, *, check: Callable, run: Callable,
             allocate: Optional[Callable] = None, returns=None, outs: Params = (),
             optional: Params = (), mutates: Sequence[str] = (),
             why_not_differentiable: Optional[str] = None) -> RegisteredOp:
    """Registers ``locoprop::<name>`` from its pieces (see the module docstring).

    params: the op's parameters (name, type) in schema order.
    optional: parameters (name, Optional type) added later, defaulting to None: last in both
        schemas (after ``outs`` in the ``_out`` op's), so that older positional calls bind;
        check, allocate and run get every argument in the order (params, optional, outs).
    check(*args [, *outs]): raises before any write; runs in the op, the ``_out`` op and both
        fakes (so it must work on fake tensors).
    run(*args, *outputs): writes the result into the outputs, or, for an op without
        ``allocate``, into the inputs named in ``mutates``.
    allocate(*args) -> the functional op's return value (``returns``: its type): a tensor or
        a list of them, the outputs ``run`` fills; None for an in-place op (returns None).
    outs: (name, type) pairs of ``allocate``'s outputs; when given, ``locoprop::<name>_out``
        is registered too, taking them as trailing parameters it writes into.
    why_not_differentiable: the reason in the error a backward pass through the functional
        op raises ("it computes ..."); None registers no autograd formula (an in-place op,
        which autograd cannot record: its public function refuses tensors that require grad).
    """
    if allocate is None:
        implementation, fake = _checked(check, run), _checked(check, None)
    else:
        def implementation(*args):
            check(*args)
            outputs = allocate(*args)
            run(*args, *(outputs if isinstance(outputs, list) else (outputs,)))
            return outputs

        def fake(*args):
            check(*args)
            return allocate(*args)

    n, n_opt = len(params), len(optional)
    impl = _with_signature(_canonical(implementation, n, n_opt, 0), params, returns, optional)
    op = torch.library.custom_op(f"locoprop::{name}", mutates_args=tuple(mutates))(impl)
    op.register_fake(_with_signature(_canonical(fake, n, n_opt, 0), params, returns, optional))
    if why_not_differentiable is not None:
        _NOT_DIFFERENTIABLE[name] = why_not_differentiable
        _register_no_derivative(op, name)

    out_op = None
    if outs:
        all_params, n_outs = [*params, *outs], len(outs)
        out_op = torch.library.custom_op(f"locoprop::{name}_out",
                                         mutates_args=[n for n, _ in outs])(
            _with_signature(_canonical(_checked(check, run), n, n_opt, n_outs), all_params,
                            None, optional))
        out_op.register_fake(_with_signature(
            _canonical(_checked(check, None), n, n_opt, n_outs), all_params, None, optional))
    return RegisteredOp(op=op, out_op=out_op, impl=impl)
