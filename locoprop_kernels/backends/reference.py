"""The "reference" backend: the oracle (``reference.py``) run as a backend.

Plain PyTorch on any device; half dtypes are computed in fp32, fp64 stays fp64. It is what
every other backend is tested against, and what CPU ops fall back to when the C++ extension
is not built.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import reference
from ._conv import conv_precision
from .base import HALF_DTYPES, Backend


def _math(t):
    return None if t is None else (t.float() if t.dtype in HALF_DTYPES else t)


class ReferenceBackend(Backend):
    name = "reference"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    device_types = ("cpu", "cuda", "mps", "xpu")
    reads_lr_from_device = True  # plain tensor math: a 0-d lr tensor works as a scalar

    def matched_loss_grad_into(self, x, weight, bias, target, activation, scale, anchor_weight,
                               anchor_bias, eta, out_weight, out_bias, precision):
        gw, gb = reference.matched_loss_grad(_math(x), _math(weight), _math(bias),
                                             _math(target), activation, scale=scale,
                                             anchor_weight=_math(anchor_weight),
                                             anchor_bias=_math(anchor_bias), eta=eta)
        out_weight.copy_(gw)
        if out_bias is not None:
            out_bias.copy_(gb)

    def matched_loss_grad_conv2d_into(self, x, weight, bias, target, activation, stride,
                                      padding, dilation, groups, scale, anchor_weight,
                                      anchor_bias, eta, out_weight, out_bias, precision):
        with conv_precision(precision, x.device):
            gw, gb = reference.matched_loss_grad_conv2d(
                _math(x), _math(weight), _math(bias), _math(target), activation,
                stride=stride, padding=padding, dilation=dilation, groups=groups, scale=scale,
                anchor_weight=_math(anchor_weight), anchor_bias=_math(anchor_bias), eta=eta)
        out_weight.copy_(gw)
        if out_bias is not None:
            out_bias.copy_(gb)

    def local_targets_into(self, preact, grad_preact, activation, gamma, variant, out):
        out.copy_(reference.local_targets(_math(preact), _math(grad_preact), activation, gamma,
                                          variant=variant))

    def rmsprop_step_(self, params, grads, square_avgs, momentum_bufs, grad_avgs, lr,
                      options):
        if isinstance(lr, torch.Tensor):
            lr = lr.reshape(())
        reference.rmsprop_step_(params, grads, square_avgs, momentum_bufs, grad_avgs, lr=lr,
                                **dataclasses.asdict(options))
