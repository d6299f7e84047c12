"""The hyper-parameters of a LocoProp step, described and checked once for both APIs.

``lk.LocoProp`` (the Sequential trainer) and ``lk.optim.LocoProp`` (any model) take the same
keywords with the same defaults, the official LocoProp settings (docs/design.md section 2):

    lr          1e-5    outer learning rate; inner iteration t uses lr * max(1 - t/T, lr_floor)
    variant     "M"     "M": each layer's local loss matched to its f; "S": f = identity
    gamma       10      target step: Y = f(Z0) - gamma dL/dZ, > 0
    inner_steps 10      T, RMSProp steps on the local problems per outer step, int >= 1
    lr_floor    0.25    in [0, 1]
    eta         None    prox term ||p - p0||^2 / (2 eta), > 0, or None for none
    scale       1       s, multiplies every local loss (1: summed over the rows), nonzero
    style, alpha, eps, momentum   "tf", 0.9, 1e-5, 0.999: the inner RMSProp (TF1 flavour,
                                  ``rmsprop_options.RMSpropOptions``)
    backend     None    a backend name or None (chosen per device and dtype, ``backends``)
    precision   "ieee"  the dots of the matched-loss kernels: "ieee" (fp32 FMA), "tf32", "bf16"
                        (bf16 operands, fp32 accumulation, epilogue and state); see ``ops``.
                        In a step, "tf32"/"bf16" form a Linear or Conv2d layer's stage 1
                        as Z0 + X (W - W0)^T (Z0 + conv2d(X, W - W0)), so that the small
                        inner updates survive the rounding (docs/design.md section 4)

``LocoPropConfig.check(op)`` is the one validation of these, at the public boundary; every
error reads ``locoprop.<op>: argument '<name>' expected ..., got ...``. What only one API has
(the trainer's loss_fn and grouped paths, the optimizer's layer options) is checked there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from . import backends
from .choices import PRECISIONS, VARIANTS, Variant
from .rmsprop_options import DEFAULTS, RMSpropOptions
from .validation import check_choice, check_number, fail_value


#: The official LocoProp code's inner RMSProp (docs/design.md section 2): TF1's style with
#: its defaults.
OFFICIAL_RMSPROP = DEFAULTS["tf"]


@dataclass(frozen=True)
class LocoPropConfig:
    """One LocoProp configuration; see the module docstring for each field."""

    lr: float = 1e-5
    variant: str = "M"
    gamma: float = 10.0
    inner_steps: int = 10
    lr_floor: float = 0.25
    eta: Optional[float] = None
    scale: float = 1.0
    rmsprop: RMSpropOptions = OFFICIAL_RMSPROP
    backend: Optional[str] = None
    precision: str = "ieee"

    @classmethod
    def of(cls, *, style: str, alpha: float, eps: float, momentum: float,
           **fields) -> "LocoPropConfig":
        """From the public keywords (the RMSProp ones flat, as both APIs take them)."""
        return cls(rmsprop=RMSpropOptions(style=style, alpha=alpha, eps=eps,
                                          momentum=momentum), **fields)

    def check(self, op: str, *, lr: bool = True) -> "LocoPropConfig":
        """ValueError/TypeError naming ``op`` and the first bad field; returns the config with
        numbers as floats and ``variant`` a ``Variant``. ``lr=False``: the caller checks lr
        (``lk.optim.LocoProp`` also takes a tensor lr)."""
        if lr:
            check_number(op, "lr", self.lr, low=0.0)
        check_choice(op, "variant", self.variant, VARIANTS)
        check_number(op, "gamma", self.gamma, low=0.0, low_open=True)
        steps = self.inner_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            fail_value(op, "inner_steps", "an int >= 1", repr(steps))
        check_number(op, "lr_floor", self.lr_floor, low=0.0, high=1.0)
        if self.eta is not None:
            check_number(op, "eta", self.eta, low=0.0, low_open=True)
        check_number(op, "scale", self.scale)
        if self.scale == 0:
            fail_value(op, "scale", "a nonzero number", self.scale)
        self.rmsprop.check(op)
        backends.check_name(op, self.backend)
        check_choice(op, "precision", self.precision, PRECISIONS)
        return dataclasses.replace(
            self, lr=self.lr if not lr else float(self.lr), variant=Variant(self.variant),
            gamma=float(self.gamma), lr_floor=float(self.lr_floor),
            eta=None if self.eta is None else float(self.eta), scale=float(self.scale))


__all__ = ["LocoPropConfig", "OFFICIAL_RMSPROP", "PRECISIONS", "VARIANTS", "Variant"]
