"""``torch.optim.Optimizer`` classes: ``RMSprop`` (fused, one launch per step)."""
from .rmsprop import RMSprop, rmsprop

__all__ = ["RMSprop", "rmsprop"]
