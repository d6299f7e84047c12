"""The op layer: docs/design.md section 4's functions as ``torch.library`` custom ops.

Each public function packs its arguments and calls a custom op in the ``locoprop`` namespace.
The op's real implementation validates everything (shapes, dtypes, devices, names, aliasing,
empty batches) before any write, then dispatches to a backend (``backends/``). Its
``register_fake`` twin runs the same shape checks and describes the outputs, so the ops work
under ``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``. Every op is
registered by one helper, ``_registry.register``, from its check, allocation and backend call;
``_checks`` holds the checks all op families share.

Ops, by file:
  matched_loss.py (over _matched_loss.py, what both layer types share)
    locoprop::matched_loss_grad      functional, returns (grad_weight, grad_bias)
    locoprop::matched_loss_grad_out  writes into out_weight / out_bias (arena slices)
  matched_loss_conv2d.py
    locoprop::matched_loss_grad_conv2d      the same for a Conv2d layer, returns (grad_weight,
                                            grad_bias)
    locoprop::matched_loss_grad_conv2d_out  writes into out_weight / out_bias
  local_targets.py
    locoprop::local_targets          returns Y
  rmsprop.py
    locoprop::rmsprop_step_          updates params, square_avgs, momentum_bufs in place
  _registry.py
    locoprop::not_differentiable     the backward of the functional ops: raises (see below)

Dtypes of the matched-loss ops (mixed precision, as ``torch.autocast`` records a layer):
the parameters -- weight, bias, anchor_weight, anchor_bias -- set the compute dtype and must
all have the weight's dtype. The operands x and target may each have that dtype or, when the
weight is float32 or float64, a lower-precision float (bfloat16 or float16). Nothing else
mixes: fp32 x with an fp64 weight, fp16 with bf16, integer tensors, and an operand more
precise than the weight (fp32 x with a bf16 weight: the error names the weight) are refused
with a TypeError. The math runs in the weight's dtype, fp32 for half storage (fp32 weight:
fp32 accumulation; the half operands are converted exactly), and the returned gradients have
the weight's dtype; ``out=`` buffers may be of any float dtype and receive that result
rounded once. So all-half calls (a model cast to bf16) keep half storage with fp32 math on
every backend, fp32 and mixed calls run on every backend, and an fp64 weight runs on the
reference backend (auto-selected; named, the cpp and triton backends refuse it).
``local_targets`` takes preact and grad_preact of one dtype (half ones included) and returns
Y in that dtype, computed in fp32 for half storage.

None of them is differentiable (docs/design.md section 4: the trainer calls them on detached
tensors). The functional ops accept inputs that require grad and return correct values; their
autograd formula raises a RuntimeError naming the op if a backward pass reaches them. The
in-place ones (``out=``, ``rmsprop_step_``) cannot be recorded by autograd at all, so with grad
mode on they refuse, before any write, tensors that require grad, as torch's own ``out=``
functions do.
"""
from __future__ import annotations

from ._registry import not_differentiable_op as _not_differentiable_op
from .local_targets import VARIANTS, _local_targets_op, local_targets
from ..choices import PRECISIONS
from .matched_loss import _matched_loss_grad_op, _matched_loss_grad_out_op, matched_loss_grad
from .matched_loss_conv2d import (_matched_loss_grad_conv2d_op, _matched_loss_grad_conv2d_out_op,
                                  matched_loss_grad_conv2d)
from .rmsprop import _rmsprop_step_op, rmsprop_step_

__all__ = ["matched_loss_grad", "matched_loss_grad_conv2d", "local_targets", "rmsprop_step_"]
