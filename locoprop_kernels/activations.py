"""The one activation table every backend reads.

Each transfer function f of a LocoProp layer has a convex potential F with dF/dz = f
(DESIGN.md section 2). A layer's local loss is ``F(z) - y.z`` per row, so its gradient in z is
``f(z) - y``: the "matched" loss.

| name       | f(z)                   | F(z) per row                  | modules                  |
|------------|------------------------|-------------------------------|--------------------------|
| identity   | z                      | sum z^2 / 2                   | nn.Identity              |
| tanh       | tanh z                 | sum log cosh z                | nn.Tanh                  |
| sigmoid    | 1 / (1 + exp(-z))      | sum softplus z                | nn.Sigmoid               |
| softmax    | exp z / sum exp z      | logsumexp z  (row-wise)       | nn.Softmax(dim=-1)       |
| relu       | max(z, 0)              | sum relu(z)^2 / 2             | nn.ReLU                  |
| leaky_relu | z > 0 ? z : 0.01 z     | sum z leaky_relu(z) / 2       | nn.LeakyReLU(0.01)       |

``code`` is the integer every compiled backend switches on: a Triton ``tl.constexpr`` in
``triton_kernels/activation.py`` and the C++ ``Activation`` enum in ``csrc/activation.h``
(exported as ``_C.ACTIVATION_CODES``); tests/test_activation_table.py checks that both agree
with this table. Adding an activation is one row here, one branch in each of those two files.
``modules`` are the ``nn.Module`` types that compute f, ``functions`` and ``methods`` the
function and Tensor-method forms (what ``torch.fx`` sees in a forward); ``module_mismatch`` /
``call_mismatch`` say why an instance or a call computes something else (a softmax over
another dim, another slope).
This module imports only torch: the reference and the kernels both read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F_nn
from torch import nn

#: nn.LeakyReLU()'s default slope, the only one the kernels implement.
LEAKY_RELU_SLOPE = 0.01


def _log_cosh(z: torch.Tensor) -> torch.Tensor:
    # log cosh z = |z| + log1p(exp(-2|z|)) - log 2: finite for |z| up to the dtype's max.
    a = z.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


def _any_instance(module: nn.Module) -> Optional[str]:
    return None


def _softmax_mismatch(module: nn.Module) -> Optional[str]:
    # Our softmax is over the row of a (B, d) pre-activation: dim -1 (or 1, the same axis).
    if module.dim in (-1, 1):
        return None
    return f"nn.Softmax over the features (dim=-1 or dim=1), got nn.Softmax(dim={module.dim})"


def _leaky_relu_mismatch(module: nn.Module) -> Optional[str]:
    if module.negative_slope == LEAKY_RELU_SLOPE:
        return None
    return (f"nn.LeakyReLU with negative_slope {LEAKY_RELU_SLOPE} (the only slope the kernels "
            f"implement), got negative_slope {module.negative_slope}")


def _any_call(args: tuple, kwargs: dict) -> Optional[str]:
    return None


def _softmax_call_mismatch(args: tuple, kwargs: dict) -> Optional[str]:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return None if dim == -1 else f"a softmax over dim=-1, got dim={dim}"


def _leaky_relu_call_mismatch(args: tuple, kwargs: dict) -> Optional[str]:
    slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else LEAKY_RELU_SLOPE)
    return (None if slope == LEAKY_RELU_SLOPE
            else f"leaky_relu with negative_slope {LEAKY_RELU_SLOPE}, got {slope}")


@dataclass(frozen=True)
class Activation:
    """One transfer function: name, code, f, potential F (summed over the last dim), the
    module types that compute it and why an instance of them might not."""

    name: str
    code: int
    f: Callable[[torch.Tensor], torch.Tensor]
    potential: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple = ()
    module_mismatch: Callable[[nn.Module], Optional[str]] = _any_instance
    functions: tuple = ()
    methods: tuple = ()
    call_mismatch: Callable[[tuple, dict], Optional[str]] = _any_call


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", 0, lambda z: z, lambda z: 0.5 * (z * z).sum(-1), (nn.Identity,)),
        Activation("tanh", 1, torch.tanh, lambda z: _log_cosh(z).sum(-1), (nn.Tanh,),
                   functions=(torch.tanh, F_nn.tanh), methods=("tanh",)),
        Activation("sigmoid", 2, torch.sigmoid, lambda z: F_nn.softplus(z).sum(-1),
                   (nn.Sigmoid,), functions=(torch.sigmoid, F_nn.sigmoid),
                   methods=("sigmoid",)),
        Activation("softmax", 3, lambda z: torch.softmax(z, dim=-1),
                   lambda z: torch.logsumexp(z, dim=-1), (nn.Softmax,), _softmax_mismatch,
                   functions=(torch.softmax, F_nn.softmax), methods=("softmax",),
                   call_mismatch=_softmax_call_mismatch),
        Activation("relu", 4, torch.relu, lambda z: 0.5 * (torch.relu(z) ** 2).sum(-1),
                   (nn.ReLU,), functions=(torch.relu, F_nn.relu), methods=("relu",)),
        Activation("leaky_relu", 5, lambda z: F_nn.leaky_relu(z, LEAKY_RELU_SLOPE),
                   lambda z: 0.5 * (z * F_nn.leaky_relu(z, LEAKY_RELU_SLOPE)).sum(-1),
                   (nn.LeakyReLU,), _leaky_relu_mismatch, functions=(F_nn.leaky_relu,),
                   call_mismatch=_leaky_relu_call_mismatch),
    )
}

NAMES = tuple(ACTIVATIONS)


def activation_of_call(target, args: tuple, kwargs: dict, *,
                       method: bool = False) -> Optional[Activation]:
    """The table entry a function call ``target(*args, **kwargs)`` (or, with ``method``, the
    Tensor method named ``target``) computes on its first argument; None when it is none of
    them or computes another function (e.g. a softmax over dim 0)."""
    for act in ACTIVATIONS.values():
        if (target in act.methods) if method else any(target is f for f in act.functions):
            return act if act.call_mismatch(args, kwargs) is None else None
    return None


def activation_of_module(module: nn.Module, *, op: str = "locoprop",
                         arg: str = "model") -> Optional[Activation]:
    """The table entry whose f ``module`` computes; None when it is no activation module.
    A ValueError naming ``op`` and ``arg`` when it is one of the types but computes another
    function (e.g. ``nn.LeakyReLU(0.2)``)."""
    for act in ACTIVATIONS.values():
        if type(module) in act.modules:
            problem = act.module_mismatch(module)
            if problem is not None:
                raise ValueError(f"{op}: argument '{arg}' expected {problem}")
            return act
    return None


def get_activation(name: str, *, op: str = "locoprop") -> Activation:
    """Look an activation up by name; a clear ValueError names the op and the choices."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"{op}: argument 'activation' expected one of {list(NAMES)}, got {name!r}")
    return ACTIVATIONS[name]
