"""Triton kernels of locoprop-kernels, installed as ``locoprop_kernels.triton_kernels``.

One op per module; each exposes a launcher that writes into caller-given outputs and takes
contiguous tensors (the op layer validates and makes them so). Set ``TRITON_INTERPRET=1``
before importing this package to run the kernels on CPU tensors.
"""
from ._launch import LAUNCHES
from .local_targets import local_targets_into
from .matched_loss_grad import delta, matched_loss_grad_into
from .rmsprop import rmsprop_step_

__all__ = ["LAUNCHES", "delta", "local_targets_into", "matched_loss_grad_into", "rmsprop_step_"]
