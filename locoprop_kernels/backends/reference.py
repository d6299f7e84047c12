"""The "reference" backend: the oracle (``reference.py``) run as a backend.

Plain PyTorch on any device; half dtypes are computed in fp32, fp64 stays fp64. The
matched-loss ops compute in the weight's dtype (fp32 for a half weight): half operands of an
fp32/fp64 weight (mixed precision, ``validation.OPERAND_DTYPES``) are cast up to it first,
exactly. It is what every other backend is tested against, and what CPU ops fall back to when
the C++ extension is not built.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import reference
from ._conv import conv_precision
from .base import HALF_DTYPES, Backend


def _math(t, dtype=None):
    """t in the math dtype: ``dtype`` when given, else fp32 for half storage, else t's own."""
    if t is None:
        return None
    return t.to(dtype if dtype is not None else
                (torch.float32 if t.dtype in HALF_DTYPES else t.dtype))


def _compute_dtype(weight) -> torch.dtype:
    """The matched-loss ops' math dtype: the weight's, fp32 for half storage."""
    return torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype


class ReferenceBackend(Backend):
    name = "reference"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    reads_lr_from_device = True  # plain tensor math: a 0-d lr tensor works as a scalar

    def implements(self, activation, op):
        return True  # any f, from its torch function

    def matched_loss_grad_into(self, x, weight, bias, target, activation, scale, anchor_weight,
                               anchor_bias, eta, out_weight, out_bias, precision,
                               anchor_preact=None):
        ct = _compute_dtype(weight)
        x, weight, bias = _math(x, ct), _math(weight, ct), _math(bias, ct)
        anchor_weight, anchor_bias = _math(anchor_weight, ct), _math(anchor_bias, ct)
        gw, gb = reference.matched_loss_grad(x, weight, bias, _math(target, ct), activation,
                                             scale=scale, anchor_weight=anchor_weight,
                                             anchor_bias=anchor_bias, eta=eta,
                                             anchor_preact=_math(anchor_preact, ct))
        out_weight.copy_(gw)
        if out_bias is not None:
            out_bias.copy_(gb)

    def matched_loss_grad_conv2d_into(self, x, weight, bias, target, activation, stride,
                                      padding, dilation, groups, scale, anchor_weight,
                                      anchor_bias, eta, out_weight, out_bias, precision,
                                      anchor_preact=None):
        ct = _compute_dtype(weight)
        args = (_math(x, ct), _math(weight, ct), _math(bias, ct), _math(target, ct), activation)
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, scale=scale,
                  anchor_weight=_math(anchor_weight, ct), anchor_bias=_math(anchor_bias, ct),
                  eta=eta)
        with conv_precision(precision, x.device):
            gw, gb = reference.matched_loss_grad_conv2d(
                *args, anchor_preact=_math(anchor_preact, ct), **kw)
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
