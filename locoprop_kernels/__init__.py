"""locoprop-kernels: fused ops for LocoProp (Amid, Anil, Warmuth, AISTATS 2022).

Public names (docs/design.md section 4): ``matched_loss_grad`` (``matched_loss_grad_conv2d`` for
Conv2d layers), ``local_targets``, ``rmsprop_step_``, the ``LocoProp`` trainer, ``optim``
(``optim.RMSprop``), the ``reference`` module, ``Arena``, ``ACTIVATIONS``, ``RMSpropOptions``
and ``testing``; ``register_activation`` adds a row to the activation table.
"""
from . import optim, reference, testing
from .activations import ACTIVATIONS, register_activation, unregister_activation
from .arena import Arena
from .ops import local_targets, matched_loss_grad, matched_loss_grad_conv2d, rmsprop_step_
from .rmsprop_options import RMSpropOptions
from .trainer import LocoProp

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "Arena", "LocoProp", "RMSpropOptions", "local_targets",
           "matched_loss_grad", "matched_loss_grad_conv2d", "optim", "reference",
           "register_activation", "rmsprop_step_", "testing", "unregister_activation"]
