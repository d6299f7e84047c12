"""``lk.optim.LocoProp``'s per-layer strategy: what a step builds from its parameters, kept.

A step of the per-layer strategy (docs/design.md section 9) needs, besides the records: flat
buffers for C = s gamma p.grad and for the local gradients (one per dtype, so that a
data-parallel all-reduce is one call), the RMSProp launches over them (``RMSpropSegment``),
copies of what the step writes (a step is a transaction) and, under a prox term, the centre
p0. None of it depends on the records, only on which parameters have a gradient and on their
state, so ``StepLayout`` builds it once and every later step with the same parameters and
state reuses it: per step, the host work is the records' (one op per layer per inner
iteration) plus a few foreach calls, not O(parameters) Python objects.

When a layout is reused: the same parameter objects with a gradient, in the same order, of
the same shapes, the same state tensors (``opt.state[p]``'s, by identity), the same groups'
options and backends, and no ``load_state_dict``/``add_param_group`` since (they drop the
layout). A group's lr may change freely (schedulers): it is read at every step.

The matched-loss op of a layer is checked once per step (its first call, t = 1) and repeated
at t >= 2 through ``RepeatedOp``: the backend kernel on the same tensors, no validation and
no dispatcher (for small layers the checks and ``torch.library`` dispatch cost more than the
kernel).
"""
from __future__ import annotations

import operator
from typing import List, Optional

import torch
from torch import Tensor

from ..arena import Arena
from ..inner_loop import RMSpropSegment
from ..ops.matched_loss import repeatable_matched_loss_grad
from ..rmsprop_options import RMSpropOptions
from .rmsprop import init_state, state_dtype


class FlatGrads:
    """One tensor per parameter (its state dtype), as views of one flat buffer per (dtype,
    device): foreach-free whole-buffer arithmetic and one all-reduce per dtype."""

    def __init__(self, params: list):
        by_dtype: dict = {}
        for p in params:
            by_dtype.setdefault((state_dtype(p), p.device), []).append(p)
        self.buffers, self._views = [], {}
        for (dtype, device), ps in by_dtype.items():
            arena = Arena([p.shape for p in ps], dtype=dtype, device=device, fill=None)
            self.buffers.append(arena.buffer)
            self._views.update(zip(ps, arena.views()))
        # In the parameters' order (one foreach call fills them all).
        self.views = [self._views[p] for p in params]

    def __getitem__(self, p: Tensor) -> Tensor:
        return self._views[p]

    def __contains__(self, p: Tensor) -> bool:
        return p in self._views

    def zero_(self) -> None:
        for b in self.buffers:
            b.zero_()

    def mul_(self, value: float) -> None:
        for b in self.buffers:
            b.mul_(value)

    def all_reduce_(self, dp, *, average: bool = False) -> None:
        """Sum (or average) over the replicas of ``dp``; nothing without data parallel."""
        for b in self.buffers:
            dp.all_reduce_grads_(b)
            if average and dp.active:
                b.div_(dp.world_size)


class Backup:
    """Copies of what a step writes (parameters, their state tensors; which states did not
    exist), to put back if the step fails: a step is applied whole or not at all. Built once
    (the copies allocated), filled by ``save`` at every step: two foreach copies. A step writes
    only tensors (in place) and creates states before ``save`` (``StepLayout.bind``), so
    nothing else needs putting back."""

    def __init__(self, params: list, state, absent=()):
        self.params = [p.detach() for p in params]
        self.saved_params = [p.detach().clone() for p in params]
        self.absent = set(absent)  # states the layout created: a failed first step drops them
        self.keys = [(p, k) for p in params for k, v in state[p].items()
                     if isinstance(v, Tensor)]
        self.live = [state[p][k] for p, k in self.keys]
        self.saved = [t.clone() for t in self.live]

    def matches(self, state) -> bool:
        """Whether ``state`` still holds the tensors this backup copies."""
        try:
            return all(map(operator.is_, (state[p][k] for p, k in self.keys), self.live))
        except KeyError:
            return False

    def save(self) -> None:
        torch._foreach_copy_(self.saved_params, self.params)
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    def restore(self, state) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved_params)
            if self.live:
                torch._foreach_copy_(self.live, self.saved)  # in place: others hold them
        for p in self.absent:
            state.pop(p, None)

    def committed(self) -> None:
        """The step went through: the states it created exist from now on."""
        self.absent.clear()


class StepLayout:
    """A step's buffers, segments and backup for one set of parameters with a gradient (see
    the module docstring for when it is reused): ``constant`` and ``backup`` for both
    strategies; ``grads``, ``anchors`` and the RMSProp ``parts`` for the per-layer one, built on
    its first use (``per_layer()``), so that the grouped strategy holds no unused buffer.

    ``parts``: one ``RMSpropSegment`` per (param group, backend, options, device, dtype) over
    ``grads``' views; ``segments(groups)`` merges the parts whose current lr and the rest agree
    (one launch in the usual case). ``bind`` creates the parameters' state (torch's format),
    once the step's checks have passed; a failed first step drops it again (``Backup``)."""

    def __init__(self, params: list, groups: list, *, with_anchors: bool):
        self.params = params
        self.ids = tuple(map(id, params))
        self.shapes = [p.shape for p in params]
        self.constant = FlatGrads(params)
        self.options = [(RMSpropOptions.from_group(g), g["backend"]) for g in groups]
        self.with_anchors = with_anchors
        self.backup: Optional[Backup] = None
        self._members: list = []  # (group index, options, [params with a gradient of it])
        self.grads: Optional[FlatGrads] = None
        self.anchors: Optional[list] = None
        self.parts: list = []
        self.part_group: list = []  # the group index of each part
        self.checked = False  # a run of the segments' rmsprop_step_ was checked
        self.grouped = None  # the grouped strategy's views of it (optim/locoprop.py), once

    def bind(self, groups: list, state) -> Backup:
        """The parameters' state, created where missing, and the backup of the step (both
        once per layout)."""
        if self.backup is None:
            absent = [p for p in self.params if not state.get(p)]
            with_grad = set(self.ids)
            for gi, group in enumerate(groups):
                options = RMSpropOptions.from_group(group)
                members = [p for p in group["params"] if id(p) in with_grad]
                for p in members:
                    init_state(state[p], p, options)
                self._members.append((gi, options, members))
            self.backup = Backup(self.params, state, absent)
        return self.backup

    def per_layer(self, groups: list, state) -> "StepLayout":
        """Build the per-layer strategy's gradient buffers, prox centre and segments (once)."""
        if self.grads is not None:
            return self
        params = self.params
        self.grads = FlatGrads(params)
        self.anchors = [torch.empty_like(p) for p in params] if self.with_anchors else None
        for gi, options, members in self._members:
            group = groups[gi]
            by_key: dict = {}
            for p in members:
                st = state[p]
                key = (group["backend"], options, p.device, p.dtype)
                seg = by_key.get(key)
                if seg is None:
                    seg = by_key[key] = RMSpropSegment(
                        [], [], [], [] if options.has_momentum else None, options,
                        group["lr"], group["backend"])
                    self.parts.append(seg)
                    self.part_group.append(gi)
                seg.params.append(p)
                seg.grads.append(self.grads[p])
                seg.square_avgs.append(st["square_avg"])
                if options.has_momentum:
                    seg.momentum_bufs.append(st["momentum_buffer"])
        return self

    def fits(self, params: list, groups: list, state, with_anchors: bool) -> bool:
        """Whether this step (its parameters with a gradient, groups and state) can reuse
        the layout: identity and shape checks, no allocation."""
        return (self.with_anchors == with_anchors and tuple(map(id, params)) == self.ids
                and [p.shape for p in params] == self.shapes
                and len(groups) == len(self.options)
                and all(o == (RMSpropOptions.from_group(g), g["backend"])
                        for o, g in zip(self.options, groups))
                and self.backup is not None and self.backup.matches(state))

    def segments(self, groups: list) -> list:
        """The RMSProp launches of one inner iteration with the groups' current lrs: parts
        with the same (lr, backend, options, device, dtype) merged, in group order."""
        merged: dict = {}
        for seg, gi in zip(self.parts, self.part_group):
            lr = groups[gi]["lr"]
            key = (lr if not isinstance(lr, Tensor) else id(lr), seg.backend, seg.options,
                   seg.params[0].device, seg.params[0].dtype)
            have = merged.get(key)
            if have is None:
                merged[key] = RMSpropSegment(list(seg.params), list(seg.grads),
                                             list(seg.square_avgs),
                                             None if seg.momentum_bufs is None
                                             else list(seg.momentum_bufs),
                                             seg.options, lr, seg.backend)
                continue
            have.params += seg.params
            have.grads += seg.grads
            have.square_avgs += seg.square_avgs
            if have.momentum_bufs is not None:
                have.momentum_bufs += seg.momentum_bufs
        return list(merged.values())


class RepeatedOp:
    """One layer's matched-loss op of a step: checked and run once (``lk.matched_loss_grad``
    or its Conv2d twin), then repeated on the same tensors by ``again()`` (the backend only).

    ``weight``/``bias`` are the layer's parameters; ``dtype`` the records' compute dtype. A
    parameter of another dtype (half parameters, fp32 records) is read through a staging copy
    refreshed before every repeat; one of that dtype is read in place (a detached alias sees
    the inner loop's updates). ``in_out``: the module stores W as (d_in, d_out) (Conv1D).
    ``anchor_preact`` Z0 with ``anchors`` (W0, b0 or None; the parameters' layout, of
    ``dtype``, constant through the step): stage 1 in the delta form
    Z = Z0 + X (W - W0)^T + (b - b0), for a Conv2d (``conv2d`` given) Z0 + conv2d(X, W - W0)
    + (b - b0) with Z0 of the targets' shape (``lk.matched_loss_grad[_conv2d]``'s
    anchor_preact)."""

    __slots__ = ("grad_weight", "grad_bias", "_again", "_staged")

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                 activation: str, *, dtype: torch.dtype, in_out: bool, conv2d: Optional[dict],
                 scale: float, backend, precision: str, anchor_preact: Optional[Tensor] = None,
                 anchors: Optional[tuple] = None):
        self._staged: List[tuple] = []

        def read(p: Optional[Tensor]) -> Optional[Tensor]:
            if p is None:
                return None
            live = p.detach()
            if live.dtype == dtype:
                return live
            staged = live.to(dtype)
            self._staged.append((staged, live))
            return staged

        w, b = read(weight), read(bias)
        w0 = b0 = None
        if anchor_preact is not None:
            w0, b0 = anchors
            w0 = w0.t() if in_out else w0
        self.grad_weight, self.grad_bias, self._again = repeatable_matched_loss_grad(
            x, w.t() if in_out else w, b, target, activation, conv2d=conv2d, scale=scale,
            backend=backend, precision=precision, anchor_preact=anchor_preact,
            anchor_weight=w0, anchor_bias=b0)

    def again(self) -> None:
        """The same op at the parameters' current values, into the same gradient tensors."""
        for staged, live in self._staged:
            staged.copy_(live)
        self._again()


__all__ = ["Backup", "FlatGrads", "RepeatedOp", "StepLayout"]
