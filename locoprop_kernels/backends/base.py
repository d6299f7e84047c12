"""The interface every backend implements, and everything backend-specific the rest asks of it.

A backend writes into caller-given outputs; arguments arrive validated (``validation.py``, the
op layer), so a backend only makes the layouts its kernels need:

    matched_loss_grad_into(x, weight, bias, target, activation, scale, anchor_weight,
                           anchor_bias, eta, out_weight, out_bias, precision, anchor_preact=)
    matched_loss_grad_conv2d_into(x, weight, bias, target, activation, stride, padding,
                                  dilation, groups, scale, anchor_weight, anchor_bias, eta,
                                  out_weight, out_bias, precision, anchor_preact=)
    local_targets_into(preact, grad_preact, activation, gamma, variant, out)
    rmsprop_step_(params, grads, square_avgs, momentum_bufs, grad_avgs, lr, options)

What callers may ask instead of comparing names: which dtypes it computes on (``dtypes``),
whether it reads a learning rate from a device tensor without a host sync
(``reads_lr_from_device``), whether its launches can be captured in a CUDA graph
(``can_capture_graph``), whether the trainer should group layers by default
(``prefers_grouped``), its grouped matched-loss entry (``grouped_matched_loss_grad``), and how
many kernel launches it has made (``launches``, for ``testing.count_launches``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


class Backend(ABC):
    """One implementation of the ops; see the module docstring."""

    #: The name users pass as ``backend=``.
    name: str
    #: Parameter/activation storage dtypes it computes on.
    dtypes: tuple
    #: True when ``rmsprop_step_`` reads a device ``lr`` tensor itself (no host sync).
    reads_lr_from_device: bool = False

    def implements(self, activation, op: str) -> bool:
        """Whether this backend has a kernel for ``activation`` (a table row) in ``op``: the
        compiled backends implement the built-in rows' codes."""
        return activation.builtin

    def can_capture_graph(self, device: torch.device) -> bool:
        """Whether a loop of this backend's ops on ``device`` can be captured in a CUDA graph."""
        return False

    def prefers_grouped(self, device: torch.device) -> bool:
        """Whether the trainer's grouped inner loop (all layers per launch) pays off here."""
        return False

    def grouped_matched_loss_grad(self, group) -> Optional[Callable]:
        """A runner for all layers' matched-loss gradients of ``grouped.LayerGroup`` at once,

            run(params, grads, *, scale, anchors, eta) -> None   (flat buffers, group layout)

        or None when this backend has no grouped kernel (the group then calls the op once per
        layer: the same results, more launches). Built once per group."""
        return None

    def launches(self) -> int:
        """Kernel launches (or calls into compiled code) made so far; 0 for pure PyTorch."""
        return 0

    @abstractmethod
    def matched_loss_grad_into(self, x, weight, bias, target, activation, scale, anchor_weight,
                               anchor_bias, eta, out_weight, out_bias, precision,
                               anchor_preact=None) -> None:
        """out_weight, out_bias <- the matched-loss gradient (ops.matched_loss_grad). The prox
        term is on when ``eta`` is given; ``anchor_preact`` Z0 (then anchor_weight W0, and
        anchor_bias b0 with a bias, are given too, with or without eta) makes stage 1's
        pre-activation Z = Z0 + X (W - W0)^T + (b - b0), only the update on low-precision
        operands."""

    @abstractmethod
    def matched_loss_grad_conv2d_into(self, x, weight, bias, target, activation, stride,
                                      padding, dilation, groups, scale, anchor_weight,
                                      anchor_bias, eta, out_weight, out_bias,
                                      precision, anchor_preact=None) -> None:
        """out_weight, out_bias <- a Conv2d layer's matched-loss gradient
        (ops.matched_loss_grad_conv2d); stride, padding, dilation are pairs of ints.
        ``anchor_preact`` Z0 (N, C_out, H_out, W_out) as in ``matched_loss_grad_into``:
        Z = Z0 + conv2d(X, W - W0) + (b - b0)."""

    @abstractmethod
    def local_targets_into(self, preact, grad_preact, activation, gamma, variant, out) -> None:
        """out <- LocoProp's targets (ops.local_targets)."""

    @abstractmethod
    def rmsprop_step_(self, params, grads, square_avgs, momentum_bufs, grad_avgs, lr,
                      options) -> None:
        """One RMSProp step in place on every tensor (``rmsprop_options``). ``lr`` is a float,
        or a one-element fp32 tensor on the params' device when ``reads_lr_from_device``."""
