"""The one activation table every backend reads.

Each transfer function f of a LocoProp layer has a convex potential F with dF/dz = f
(docs/design.md section 2). A layer's local loss is ``F(z) - y.z`` per row, so its gradient in z is
``f(z) - y``: the "matched" loss.

| name       | f(z)                   | F(z) per row                  | modules                  |
|------------|------------------------|-------------------------------|--------------------------|
| identity   | z                      | sum z^2 / 2                   | nn.Identity              |
| tanh       | tanh z                 | sum log cosh z                | nn.Tanh                  |
| sigmoid    | 1 / (1 + exp(-z))      | sum softplus z                | nn.Sigmoid               |
| softmax    | exp z / sum exp z      | logsumexp z  (row-wise)       | nn.Softmax(dim=-1)       |
| relu       | max(z, 0)              | sum relu(z)^2 / 2             | nn.ReLU                  |
| leaky_relu | z > 0 ? z : 0.01 z     | sum z leaky_relu(z) / 2       | nn.LeakyReLU(0.01)       |
| gelu       | z Phi(z)               | ((z^2 - 1) Phi + z phi) / 2   | nn.GELU()                |
| gelu_tanh  | GELU's tanh form       | quadrature (below)            | nn.GELU("tanh")          |
| silu       | z sigmoid(z)           | quadrature (below)            | nn.SiLU                  |

GELU, its tanh form and SiLU are the activations of today's transformers (BERT and ViT: gelu;
GPT-2: gelu_tanh, transformers' "gelu_new"; Llama: silu). gelu_tanh's and silu's potentials have
no elementary closed form (silu's is z softplus(z) + Li2(-e^z)): F is computed by 48-point
Gauss-Legendre quadrature of f on [0, z] (f is smooth; it agrees with a 2e5-point
trapezoid rule to that rule's own error, 1e-9 at |z| = 30), with an exact gradient f (a custom
autograd Function), and it is used only to report local loss values: the local gradient needs
f alone. These three are not monotone, so F is not convex where f' < 0: z below about -0.7518
(gelu and gelu_tanh) and -1.2785 (silu). There the local objective F(z) - y.z has no unique
minimiser in z; LocoProp never needs one: it takes T RMSProp steps from W0 along the exact
gradient (f(Z) - Y)^T X, and at W0 the first one is still gamma x the backprop gradient
(docs/activations.md).

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

import numpy as np
import torch
import torch.nn.functional as F_nn
from torch import nn

#: nn.LeakyReLU()'s default slope, the only one the kernels implement.
LEAKY_RELU_SLOPE = 0.01


def _log_cosh(z: torch.Tensor) -> torch.Tensor:
    # log cosh z = |z| + log1p(exp(-2|z|)) - log 2: finite for |z| up to the dtype's max.
    a = z.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


def _gelu_potential(z: torch.Tensor) -> torch.Tensor:
    # F(z) = ((z^2 - 1) Phi(z) + z phi(z)) / 2: dF/dz = z Phi(z) (phi' = -z phi). Phi through
    # erfc keeps the z -> -inf tail free of 1 - 1 cancellation.
    cdf = 0.5 * torch.special.erfc(-z / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return 0.5 * ((z * z - 1.0) * cdf + z * pdf)


#: Gauss-Legendre nodes and weights on [-1, 1] for the quadrature potentials.
_GL_NODES, _GL_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(48))


class _QuadraturePotential(torch.autograd.Function):
    """F(z) = integral_0^z f(t) dt by Gauss-Legendre quadrature; dF/dz = f(z) exactly."""

    @staticmethod
    def forward(ctx, z, f):
        ctx.f = f
        ctx.save_for_backward(z)
        nodes = _GL_NODES.to(z.device, torch.float64)
        weights = _GL_WEIGHTS.to(z.device, torch.float64)
        z64 = z.double().unsqueeze(-1)
        t = 0.5 * z64 * (nodes + 1.0)  # [-1, 1] -> [0, z]
        return (0.5 * z64 * (weights * f(t))).sum(-1).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * ctx.f(z), None


def _quadrature_potential(f):
    return lambda z: _QuadraturePotential.apply(z, f).sum(-1)


def _gelu_tanh(z):
    return F_nn.gelu(z, approximate="tanh")


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


def _gelu_module(approximate: str):
    def mismatch(module: nn.Module) -> Optional[str]:
        return (None if module.approximate == approximate else
                f"nn.GELU(approximate={approximate!r}), got approximate={module.approximate!r}")
    return mismatch


def _gelu_call(approximate: str):
    def mismatch(args: tuple, kwargs: dict) -> Optional[str]:
        got = kwargs.get("approximate", "none")
        return None if got == approximate else f"gelu(approximate={approximate!r}), got {got!r}"
    return mismatch


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
    #: True for the built-in rows, whose ``code`` the compiled kernels implement; a row added
    #: with ``register_activation`` runs where a backend has its f (``Backend.implements``).
    builtin: bool = True
    #: A ``@triton.jit`` elementwise f(z) (fp32 in, fp32 out) for the fused per-layer kernel.
    triton_f: Optional[Callable] = None


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
        Activation("gelu", 6, F_nn.gelu, lambda z: _gelu_potential(z).sum(-1), (nn.GELU,),
                   _gelu_module("none"), functions=(F_nn.gelu,),
                   call_mismatch=_gelu_call("none")),
        Activation("gelu_tanh", 7, _gelu_tanh, _quadrature_potential(_gelu_tanh), (nn.GELU,),
                   _gelu_module("tanh"), functions=(F_nn.gelu,),
                   call_mismatch=_gelu_call("tanh")),
        Activation("silu", 8, F_nn.silu, _quadrature_potential(F_nn.silu), (nn.SiLU,),
                   functions=(F_nn.silu,)),
    )
}

#: Codes of registered rows start here: no compiled kernel switches on them.
FIRST_USER_CODE = 1000


def register_activation(name: str, f: Callable, *, potential: Optional[Callable] = None,
                        modules: tuple = (), functions: tuple = (), methods: tuple = (),
                        triton_f: Optional[Callable] = None) -> Activation:
    """Add an activation to the table; returns its row.

    ``f``: z (..., d) -> f(z), a torch function of the pre-activation with the features on
    the last dim (all a matched-loss gradient needs: (f(Z) - Y)^T X). ``potential``: F with
    dF/dz = f, summed over the last dim, used only to report local loss values; default: for
    an elementwise f, 48-point Gauss-Legendre of f on [0, z] with an exact gradient.
    ``modules`` / ``functions`` / ``methods``: the module types, functions and Tensor-method
    names that compute f (detection and the Sequential trainer map them to this row; a
    parameter-free module is also recognised by what it computes). ``triton_f``: a
    ``@triton.jit`` elementwise f for the fused per-layer Triton kernel (without it the
    triton backend computes this row's matched loss in PyTorch, as the cpp backend always
    does). A name already in the table (built-in or registered) is refused."""
    op = "locoprop.register_activation"
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{op}: argument 'name' expected an identifier, got {name!r}")
    if name in ACTIVATIONS:
        kind = "built-in" if ACTIVATIONS[name].builtin else "registered"
        raise ValueError(f"{op}: argument 'name' {name!r} clashes with the {kind} activation "
                         f"of that name (unregister_activation removes a registered one)")
    if not callable(f):
        raise TypeError(f"{op}: argument 'f' expected a callable, got {type(f).__name__}")
    if potential is not None and not callable(potential):
        raise TypeError(f"{op}: argument 'potential' expected a callable or None, got "
                        f"{type(potential).__name__}")
    for arg, value in (("modules", modules), ("functions", functions), ("methods", methods)):
        if not isinstance(value, tuple):
            raise TypeError(f"{op}: argument '{arg}' expected a tuple, got "
                            f"{type(value).__name__}")
    code = max([FIRST_USER_CODE - 1] + [a.code for a in ACTIVATIONS.values()]) + 1
    row = Activation(name, code, f, potential or _quadrature_potential(f), modules,
                     functions=functions, methods=methods, builtin=False, triton_f=triton_f)
    ACTIVATIONS[name] = row
    return row


def unregister_activation(name: str) -> None:
    """Remove a registered activation (built-in rows cannot be removed)."""
    row = ACTIVATIONS.get(name)
    if row is None or row.builtin:
        raise ValueError(f"locoprop.unregister_activation: argument 'name' expected a "
                         f"registered activation, got {name!r}")
    del ACTIVATIONS[name]


def activation_of_call(target, args: tuple, kwargs: dict, *,
                       method: bool = False) -> Optional[Activation]:
    """The table entry a function call ``target(*args, **kwargs)`` (or, with ``method``, the
    Tensor method named ``target``) computes on its first argument; None when it is none of
    them or computes another function (e.g. a softmax over dim 0)."""
    for act in ACTIVATIONS.values():
        if (target in act.methods) if method else any(target is f for f in act.functions):
            if act.call_mismatch(args, kwargs) is None:
                return act  # else another entry of the same function may match (F.gelu)
    return None


def activation_of_module(module: nn.Module, *, op: str = "locoprop",
                         arg: str = "model") -> Optional[Activation]:
    """The table entry whose f ``module`` computes; None when it is no activation module.
    A ValueError naming ``op`` and ``arg`` when it is one of the types but computes another
    function (e.g. ``nn.LeakyReLU(0.2)``)."""
    problem = None
    for act in ACTIVATIONS.values():
        if type(module) in act.modules:
            problem = problem or act.module_mismatch(module)
            if act.module_mismatch(module) is None:
                return act  # nn.GELU: gelu or gelu_tanh by its approximate
    if problem is not None:
        raise ValueError(f"{op}: argument '{arg}' expected {problem}")
    return None


def get_activation(name: str, *, op: str = "locoprop") -> Activation:
    """Look an activation up by name; a clear ValueError names the op and the choices."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"{op}: argument 'activation' expected one of {list(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
