"""LocoProp's local targets from one forward/backward pass: ``locoprop::local_targets``.

    variant "M": Y = f(Z) - gamma * G      variant "S": Y = Z - gamma * G

preact Z and grad_preact G = dL/dZ are (B, d_out) of one dtype (half ones included); Y has
that dtype, computed in fp32 for half storage.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ..activations import get_activation
from ..validation import check_call_types, check_choice, check_matrix, check_number, check_tensor
from ._checks import backend_arg, check_backend_dtype
from ..choices import VARIANTS
from ._registry import autocast_off, register

Tensor = torch.Tensor
_OP = "local_targets"


def _check(preact, grad_preact, activation, gamma, variant, backend):
    """Every argument, before anything is written."""
    get_activation(activation, op=f"locoprop.{_OP}")
    check_matrix(_OP, "preact", preact, rows_name="B", cols_name="d_out")
    check_tensor(_OP, "grad_preact", grad_preact, shape=tuple(preact.shape),
                 device=preact.device, dtype=preact.dtype, what=" (preact's shape and dtype)")
    check_number(_OP, "gamma", gamma)
    check_choice(_OP, "variant", variant, VARIANTS)


def _allocate(preact, *_):
    return torch.empty_like(preact, memory_format=torch.contiguous_format)


def _run(preact, grad_preact, activation, gamma, variant, backend, out):
    be = backends.resolve(_OP, backend, preact.device, preact.dtype,
                          activation=get_activation(activation), variant=variant)
    check_backend_dtype(_OP, be, "preact", preact)
    with autocast_off(preact.device):
        be.local_targets_into(preact, grad_preact, activation, float(gamma), variant, out)


_local_targets_op = register(
    _OP, (("preact", Tensor), ("grad_preact", Tensor), ("activation", str), ("gamma", float),
          ("variant", str), ("backend", str)),
    check=_check, run=_run, allocate=_allocate, returns=Tensor,
    why_not_differentiable="it forms the local problem's targets from a gradient, in closed "
                           "form").op


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
    check_call_types(_OP, tensors=[("preact", preact), ("grad_preact", grad_preact)],
                     numbers=[("gamma", gamma)], strings=[("activation", activation),
                                                          ("variant", variant)])
    backend = backend_arg(_OP, backend)
    return _local_targets_op(preact, grad_preact, activation, float(gamma), variant, backend)
