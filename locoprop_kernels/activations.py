"""The one activation table every backend reads.

Each transfer function f of a LocoProp layer has a convex potential F with dF/dz = f
(DESIGN.md section 2). A layer's local loss is ``F(z) - y.z`` per row, so its gradient in z is
``f(z) - y``: the "matched" loss.

| name     | f(z)                  | F(z) per row          | row-wise |
|----------|-----------------------|-----------------------|----------|
| tanh     | tanh z                | sum log cosh z        | no       |
| sigmoid  | 1 / (1 + exp(-z))     | sum softplus z        | no       |
| softmax  | exp z / sum exp z     | logsumexp z           | yes      |
| identity | z                     | sum z^2 / 2           | no       |
| relu     | max(z, 0)             | sum relu(z)^2 / 2     | no       |

``code`` is the integer every compiled backend switches on (a Triton ``tl.constexpr`` and the
C++ ``Activation`` enum in ``csrc/activation.h``): adding an activation is one row here, one
branch in ``triton_kernels/activation.py`` and one in ``csrc/activation.h``.
This module imports only torch: the reference and the kernels both read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F_nn


def _log_cosh(z: torch.Tensor) -> torch.Tensor:
    # log cosh z = |z| + log1p(exp(-2|z|)) - log 2: finite for |z| up to the dtype's max.
    a = z.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


@dataclass(frozen=True)
class Activation:
    """One transfer function: its name, code, f, potential F (summed over the last dim)."""

    name: str
    code: int
    f: Callable[[torch.Tensor], torch.Tensor]
    potential: Callable[[torch.Tensor], torch.Tensor]
    row_wise: bool = False  # f of one element depends on its whole row (softmax)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", 0, lambda z: z, lambda z: 0.5 * (z * z).sum(-1)),
        Activation("tanh", 1, torch.tanh, lambda z: _log_cosh(z).sum(-1)),
        Activation("sigmoid", 2, torch.sigmoid, lambda z: F_nn.softplus(z).sum(-1)),
        Activation("softmax", 3, lambda z: torch.softmax(z, dim=-1),
                   lambda z: torch.logsumexp(z, dim=-1), row_wise=True),
        Activation("relu", 4, torch.relu, lambda z: 0.5 * (torch.relu(z) ** 2).sum(-1)),
    )
}

NAMES = tuple(ACTIVATIONS)


def get_activation(name: str, *, op: str = "locoprop") -> Activation:
    """Look an activation up by name; a clear ValueError names the op and the choices."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"{op}: argument 'activation' expected one of {list(NAMES)}, got {name!r}")
    return ACTIVATIONS[name]
