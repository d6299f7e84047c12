"""``torch.optim.Optimizer`` classes: ``RMSprop`` (fused, one launch per step) and ``LocoProp``
(LocoProp on any model, in the standard training loop)."""
from .layers import LayerInfo, register_affine_type
from .locoprop import LocoProp
from .rmsprop import RMSprop, rmsprop

__all__ = ["LayerInfo", "LocoProp", "RMSprop", "register_affine_type", "rmsprop"]
