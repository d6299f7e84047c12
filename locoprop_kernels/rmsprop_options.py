"""The one description of an RMSProp update: every backend and the op layer take this object.

Per element, math in fp32 (fp64 for fp64 parameters), g the gradient, p the parameter:

    g  = -g if maximize;   g = g + weight_decay * p   if weight_decay != 0
    ms = alpha * ms + (1 - alpha) * g^2
    v  = ms - ga^2 with ga = lerp(ga, g, 1 - alpha)   if centered, else v = ms
    style "torch" (``torch.optim.RMSprop``; ms starts at 0):
        d = g / (sqrt(v) + eps);      buf = momentum * buf + d, d = buf   if momentum != 0
        p = p - lr * d
    style "tf" (TF1's RMSPropOptimizer, the official LocoProp code; ms starts at 1):
        d = lr * g / sqrt(v + eps);   buf = momentum * buf + d, d = buf   if momentum != 0
        p = p - d

The momentum buffer exists only when momentum != 0 and the gradient average ``ga`` only when
centered. ``lr`` is not an option: it changes every step (schedules, LocoProp's inner loop) and
travels beside the options. The kernels' versions of this update: ``reference.rmsprop_step_``
(Python), ``triton_kernels/rmsprop.py`` (Triton) and ``csrc/rmsprop.h`` (C++ and CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

from .validation import check_choice, check_number, fail_type

STYLES = ("tf", "torch")


@dataclass(frozen=True)
class RMSpropOptions:
    """Everything of an RMSProp update but the learning rate; see the module docstring."""

    style: str = "torch"
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False

    @classmethod
    def from_group(cls, group: dict) -> "RMSpropOptions":
        """The options a ``torch.optim`` param group holds (keys named as the fields)."""
        return cls(style=group["style"], alpha=group["alpha"], eps=group["eps"],
                   weight_decay=group["weight_decay"], momentum=group["momentum"],
                   centered=group["centered"], maximize=group["maximize"])

    def check(self, op: str) -> "RMSpropOptions":
        """ValueError/TypeError naming ``op`` and the option when one is out of range."""
        check_choice(op, "style", self.style, STYLES)
        check_number(op, "alpha", self.alpha, low=0.0, high=1.0)
        check_number(op, "eps", self.eps, low=0.0)  # 0 allowed, as torch allows it
        check_number(op, "weight_decay", self.weight_decay, low=0.0)
        check_number(op, "momentum", self.momentum, low=0.0)
        for name in ("centered", "maximize"):
            if not isinstance(getattr(self, name), bool):
                fail_type(op, name, "a bool", type(getattr(self, name)).__name__)
        return self

    @property
    def has_momentum(self) -> bool:
        """Whether the update reads and writes a momentum buffer."""
        return self.momentum != 0.0

    @property
    def one_minus_alpha(self) -> float:
        # Formed in float64 and rounded once by the kernel, as torch does with its scalars.
        return 1.0 - self.alpha

    @property
    def initial_square_avg(self) -> float:
        """The value the square averages start from: 1 in TF1's flavour, 0 in torch's."""
        return 1.0 if self.style == "tf" else 0.0


#: The one default set per style: torch's (``torch.optim.RMSprop``, ``lk.optim.RMSprop``,
#: ``RMSpropOptions()``) and the official LocoProp code's TF1 one (``lk.rmsprop_step_`` and
#: the LocoProp inner loop; docs/design.md section 2). Everything else reads these.
DEFAULTS = {"torch": RMSpropOptions(),
            "tf": RMSpropOptions(style="tf", alpha=0.9, eps=1e-5, momentum=0.999)}
