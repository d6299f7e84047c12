"""The named choices of LocoProp's options, as one table each: the variant of the local loss
and the dot precision of the matched-loss kernels. The lowest floor of the package (no imports
of its own), so that the reference math, the ops and the configuration read the same names."""
from __future__ import annotations

import enum


class Variant(str, enum.Enum):
    """LocoProp's two local losses (docs/design.md section 2). A str, so that it compares equal
    to "M"/"S" and param groups may hold the plain string (torch's state_dict stays loadable
    with ``weights_only=True``)."""

    M = "M"  # each layer's loss matched to its transfer function f
    S = "S"  # every local loss quadratic in the pre-activation (f = identity)

    def local_activation(self, activation: str) -> str:
        """The f of a layer's local loss: its own f under M, identity under S."""
        return activation if self is Variant.M else "identity"


VARIANTS = tuple(v.value for v in Variant)

#: The dot precisions of the matched-loss kernels (the ops' ``precision``): fp32 on the FMA
#: units, tf32 on the tensor cores, bf16 operands with fp32 accumulation.
PRECISIONS = ("ieee", "tf32", "bf16")


__all__ = ["PRECISIONS", "VARIANTS", "Variant"]
