"""``lk.optim.LocoProp``'s grouped strategy: all layers' local problems in flat arenas, the
matched-loss gradients of every layer per launch (``grouped.LayerGroup``), the T inner
iterations in one ``InnerLoop`` (replayed as one CUDA graph with ``cuda_graph=True`` where the
backend can be captured).

It computes what the per-layer strategy computes (docs/design.md section 9): at t = 0 the
local gradient is C = s gamma p.grad, at t >= 1 every layer's matched-loss gradient with the
target f(Z0), plus C, [+ (p - p0)/eta], then one RMSProp step over the flat parameter arena.
Only the launch count and the layout differ. Layers the per-layer strategy would give the Gram
form (``gram.uses_gram``, the ``gram=`` option: f = identity, chosen per layer) take it here
too: the group leaves them out of its matched-loss launches, forms their X^T X, X^T 1 and W0
once per step (``LayerGroup.form_gram_``, before the loop and outside any CUDA graph), and every
iteration t >= 1 adds their Gram-form gradient with in-place GEMMs on static buffers (captured
with the rest of the iteration on the graph path).

When it applies (``plan``, checked at every step from the records): every layer with records
is an affine layer stored (d_out, d_in) (nn.Linear) with one stacked problem, all problems have
the same rows, their activations are built-in table rows (the grouped kernel switches on their
codes), the parameters with a gradient are exactly the layers' (W_0, b_0, W_1, ...) in one
param group of one dtype (fp32/fp64, the state dtype) and device, and there is no data
parallel, no custom target, per-layer prox or regularizer. Anything else runs per layer; the
reason is kept in ``opt.strategy``.

At precision tf32/bf16 the group is ``anchored``: stage 1 takes the delta form
Z = Z0 + X (W - W0)^T + (b - b0), as the per-layer strategy's ops do, with each problem's
recorded Z0 in the group's Z0 arena and the step's starting W0, b0 in its ``start_params``,
both filled once per step before the loop; "ieee" runs the plain kernels.

The arenas, the group (its tile tables) and the loop are cached per (layer sizes and
activations, Gram flags, the delta-form flag, rows, device, dtype, options): built on the
first step of a shape, reused while it lasts. Parameters and RMSProp state live in the model
and ``opt.state`` (torch's format); a step copies them into the arenas and back, except when
they already are consecutive views of one buffer in the arena layout (``lk.LocoProp``'s
parameter and state arenas): then the step runs on that buffer, with no copy.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..arena import layout_offsets, split_views
from ..grouped import LayerGroup, LayerSpec, param_shapes
from ..inner_loop import InnerLoop
from ..rmsprop_options import RMSpropOptions


def flat_view(tensors: Sequence[Tensor]) -> Optional[Tensor]:
    """The one contiguous buffer ``tensors`` are consecutive views of, in order (None if they
    are not): a 1-D tensor over their shared storage, no copy."""
    first = tensors[0]
    storage, start = first.untyped_storage(), first.storage_offset()
    offsets = layout_offsets([t.shape for t in tensors])
    for t, off in zip(tensors, offsets):
        if (not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != start + off):
            return None
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, start, (offsets[-1],), (1,))


class GroupedLoop:
    """The cached arenas, ``LayerGroup`` and ``InnerLoop`` of one grouped shape."""

    def __init__(self, specs: List[LayerSpec], rows: int, *, device, dtype, backend,
                 precision: str, options: RMSpropOptions, inner_steps: int, lr: float,
                 lr_floor: float, scale: float, eta: Optional[float], cuda_graph: bool,
                 buffers: Optional[tuple] = None, gram: Optional[Sequence[bool]] = None,
                 anchored: bool = False):
        self.group = LayerGroup(specs, rows, device=device, dtype=dtype, backend=backend,
                                precision=precision, gram=gram, anchored=anchored)
        self.shapes = param_shapes(specs)
        n = self.group.num_params

        def arena():
            return torch.empty(n, dtype=dtype, device=device)

        # (params, square_avgs, momentum_bufs): the caller's own flat buffers, or ours.
        self.owned = buffers is None
        self.params, self.square_avgs, self.momentum_bufs = (
            buffers if buffers is not None else (arena(), arena(), arena()))
        self.constant = arena()
        self.loop = InnerLoop.for_group(
            self.group, self.params, self.square_avgs, self.momentum_bufs,
            inner_steps=inner_steps, lr=lr, lr_floor=lr_floor, options=options, scale=scale,
            eta=eta, grads=torch.zeros(n, dtype=dtype, device=device),
            constant=self.constant, cuda_graph=cuda_graph)
        self.options = options

    @property
    def graph_state(self) -> str:
        return self.loop.graph_state

    def run(self, problems, params: List[Tensor], square_avgs: List[Tensor],
            momentum_bufs: Optional[List[Tensor]], constant: List[Tensor], lr: float) -> None:
        """One outer step's T inner iterations: the problems' X and f(Z0) (matched layers
        only: a Gram layer's target is its W0) into the group's arenas, and Z0 too for an
        anchored group (the delta form), C (``constant``, per parameter) into the constant
        arena, the parameters and state in (unless they are the arenas), the Gram layers'
        X^T X, X^T 1 and W0 and an anchored group's W0, b0, the loop, and the results back."""
        group = self.group
        for view, problem in zip(group.inputs.views(), problems):
            view.copy_(problem.x)
        for i, (view, problem) in enumerate(zip(group.targets.views(), problems)):
            if not group.gram[i]:
                view.copy_(problem.y)
                if group.anchored:
                    group.anchor_preacts[i].copy_(problem.z0)
        torch._foreach_copy_(split_views(self.constant, self.shapes), constant)
        outside = [] if not self.owned else [(self.params, params),
                                             (self.square_avgs, square_avgs)]
        if self.owned and momentum_bufs is not None:
            outside.append((self.momentum_bufs, momentum_bufs))
        for flat, tensors in outside:
            torch._foreach_copy_(split_views(flat, self.shapes), [t.detach() for t in tensors])
        # After the params are in, outside any CUDA graph: W0 is this step's start.
        group.form_gram_(self.params)
        if group.anchored:
            group.form_anchors_(self.params)
        if self.loop.lr != lr:
            self.loop.set_lr(lr)
        self.loop.run()
        for flat, tensors in outside:
            torch._foreach_copy_([t.detach() for t in tensors], split_views(flat, self.shapes))
