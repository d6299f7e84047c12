"""LocoProp's inner loop: the one implementation ``lk.optim.LocoProp`` runs (per layer or
grouped; ``lk.LocoProp`` is a thin layer over it), eager or replayed as one CUDA graph.

With every layer's input X and target fixed, it takes T RMSProp steps on all local problems
together (docs/design.md section 2). A LocoProp layer's local gradient at iteration t is

    local_grad_t = s (f(Z_t) - Y)^T X [+ (p - p0) / eta],   Y = f(Z0) - gamma G   (design.md)
                 = s (f(Z_t) - f(Z0))^T X [+ ...] + C,       C = s gamma dL/dp

(variant S: f = identity), the second form because G^T X over the layer's calls, plus the
uses of p the hooks do not see, is the backprop gradient dL/dp. At t = 0 the parameters are
p0, Z_0 = Z0, and the local gradient is exactly C: the first inner iteration needs no GEMM and
no f (the "t = 0 skip", exact, on every backend and path; it saves one iteration's stage-1 and
stage-2 GEMMs per layer, of which autograd's weight-gradient GEMM in the backward pass gives
one back). ``lk.optim.LocoProp`` records X and Z0 (no G): its targets are f(Z0) and it
passes C (``constant``), copied at t = 0 and added at every later iteration. Without ``constant`` (C = 0: a bare ``LayerGroup`` with full targets
Y = f(Z0) - gamma G) every iteration, t = 0 included, runs the matched part.

    t = 0:       grads <- C                 (copied from ``constant``)
    t = 1..T-1:  grads <- matched_t (all layers; one all-reduce under data parallel) [+ C]
    every t:     rmsprop_step_(params, grads, state, lr = lr * max(1 - t/T, floor))  per segment

``matched_loss_grads_(eta)`` writes matched_t for every parameter (the caller's layers: a
``grouped.LayerGroup``'s two launches, or one op per layer); each ``RMSpropSegment`` is one
``rmsprop_step_`` launch over tensors that share an lr and options (one segment for a
grouped loop's flat arena; one per param group whose lr/options differ per layer).

CUDA graph (``cuda_graph=True`` where the backend can be captured: triton on CUDA): the first
``run()`` is eager (it also compiles the kernels), the second captures the T iterations once,
every later run replays them. The per-iteration rates live in a device tensor that ``set_lr``
rewrites with a device op: a replay needs no host work and a new outer lr no re-capture. Where
capture is not possible (CPU, another backend, a capture error) the loop stays eager with the
same results: ``graph_state`` says which path is in use.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import torch

from .ops import rmsprop_step_
from .ops.rmsprop import rmsprop_step_checked_again_
from .config import OFFICIAL_RMSPROP
from .rmsprop_options import RMSpropOptions
from .validation import fail_value



def inner_lr_factors(inner_steps: int, floor: float) -> list:
    """lr_t / lr = max(1 - t/T, floor) for t = 0..T-1."""
    return [max(1.0 - t / inner_steps, floor) for t in range(inner_steps)]


@dataclasses.dataclass
class RMSpropSegment:
    """Tensors that take one ``rmsprop_step_`` together (same lr and options): parameters,
    their local-gradient slots (views of the loop's flat gradient buffers) and state."""

    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    square_avgs: List[torch.Tensor]
    momentum_bufs: Optional[List[torch.Tensor]]
    options: RMSpropOptions
    lr: float
    backend: Optional[str] = None


class InnerLoop:
    """T RMSProp steps on every layer's local problem; see the module docstring.

    ``grads``: the flat gradient buffers every segment's ``grads`` view; ``constant``: C in the
    same layout (None: C = 0, no t = 0 skip); ``prox_centre``: (p0 copies, params), copied at every
    ``run()`` (with ``eta``); ``dp``: ``distributed.DataParallel``. ``checked``: the segments'
    tensors (the same objects) went through a checked ``rmsprop_step_`` already, in an earlier
    loop (``lk.optim.LocoProp``'s cached per-layer layout): no iteration checks them again.
    """

    def __init__(self, matched_loss_grads_: Callable[[Optional[float]], None],
                 grads: Sequence[torch.Tensor], segments: Sequence[RMSpropSegment], *,
                 inner_steps: int = 10, lr_floor: float = 0.25, eta: Optional[float] = None,
                 prox_centre: Optional[tuple] = None, constant: Optional[Sequence] = None,
                 dp=None, cuda_graph: bool = False,
                 can_capture_graph: bool = False, checked: bool = False):
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            fail_value("InnerLoop", "inner_steps", "an int >= 1", repr(inner_steps))
        if eta is not None and prox_centre is None:
            fail_value("InnerLoop", "prox_centre", "(anchors, params) when eta is given", None)
        self._matched_loss_grads_ = matched_loss_grads_
        self.grad_buffers = list(grads)
        self.constant = None if constant is None else list(constant)
        self.segments = list(segments)
        # rmsprop_step_'s keywords per segment, formed once (not per inner iteration).
        self._rmsprop_kwargs = [dict(dataclasses.asdict(seg.options), backend=seg.backend)
                                for seg in self.segments]
        self.inner_steps, self.lr_floor, self.eta = inner_steps, float(lr_floor), eta
        self.prox_centre = prox_centre
        self.dp = dp
        self.checked = checked
        device = self.grad_buffers[0].device
        self._on_device = device.type == "cuda"
        # One row of per-iteration rates per segment, on the device (read by the kernels and by
        # a captured graph), and the same rates as host floats for the CPU.
        self._lrs = torch.empty((len(self.segments), inner_steps), dtype=torch.float32,
                                device=device)
        self._lr_views = [[self._lrs[s, t:t + 1] for t in range(inner_steps)]
                          for s in range(len(self.segments))]
        self._host_lrs = [[0.0] * inner_steps for _ in self.segments]
        self.set_lrs([seg.lr for seg in self.segments])
        self.use_graph = cuda_graph and can_capture_graph and (dp is None or not dp.active)
        self.graph_state = "eager" if not self.use_graph else "warmup"
        self._graph = None
        self._runs = 0

    @classmethod
    def for_group(cls, group, params: torch.Tensor, square_avgs: torch.Tensor,
                  momentum_bufs: torch.Tensor, *, inner_steps: int = 10, lr: float = 1e-5,
                  lr_floor: float = 0.25, options: RMSpropOptions = OFFICIAL_RMSPROP,
                  scale: float = 1.0, eta: Optional[float] = None,
                  grads: Optional[torch.Tensor] = None,
                  constant: Optional[torch.Tensor] = None, cuda_graph: bool = False,
                  **kwargs) -> "InnerLoop":
        """The loop over a ``grouped.LayerGroup`` whose parameters, gradients and state are flat
        buffers in its ``param_shapes`` layout (``optim/grouped_step.py``'s arenas); its targets
        are f(Z0) when ``constant`` (C, flat) is given, Y = f(Z0) - gamma G otherwise."""
        # The state dtype: fp64 for fp64 parameters, fp32 otherwise (an fp32 default here
        # rounded an fp64 problem's gradients to fp32).
        grads = grads if grads is not None else torch.zeros(
            params.shape, dtype=torch.float64 if params.dtype == torch.float64
            else torch.float32, device=params.device)
        anchors = params.detach().clone() if eta is not None else None
        options = options.check("InnerLoop")
        segment = RMSpropSegment([params], [grads], [square_avgs],
                                 [momentum_bufs] if options.has_momentum else None, options,
                                 lr, group.backend.name)

        def matched(local_eta):
            group.matched_loss_grads_(params, grads, scale=scale, anchors=anchors, eta=local_eta)

        loop = cls(matched, [grads], [segment], inner_steps=inner_steps, lr_floor=lr_floor,
                   eta=eta, prox_centre=None if anchors is None else ([anchors], [params]),
                   constant=None if constant is None else [constant], cuda_graph=cuda_graph,
                   can_capture_graph=group.backend.can_capture_graph(params.device), **kwargs)
        loop.group, loop.params, loop.grads = group, params, grads
        return loop

    @property
    def lr(self) -> float:
        """The outer learning rate of the first segment."""
        return self.segments[0].lr

    def set_lr(self, lr: float) -> None:
        """One outer learning rate for every segment (see ``set_lrs``)."""
        self.set_lrs([lr] * len(self.segments))

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Each segment's outer learning rate; the per-iteration rates follow the inner
        schedule. Formed in float64 on the host (as a float argument would be) and copied into
        the device tensor the kernels, and a captured graph, read: one small copy, no
        re-capture."""
        factors = inner_lr_factors(self.inner_steps, self.lr_floor)
        for seg, host, lr in zip(self.segments, self._host_lrs, lrs):
            seg.lr = float(lr)
            host[:] = [seg.lr * f for f in factors]
        self._lrs.copy_(torch.tensor(self._host_lrs, dtype=torch.float32))

    def _iterations(self, lrs) -> None:
        local_eta = self.eta if self.dp is None else self.dp.local_eta(self.eta)
        for t in range(self.inner_steps):
            if t == 0 and self.constant is not None:
                # p = p0: the matched part (and the prox term) is exactly 0; the gradient is C.
                torch._foreach_copy_(self.grad_buffers, self.constant)
            else:
                self._matched_loss_grads_(local_eta)
                if self.dp is not None:
                    for buffer in self.grad_buffers:
                        self.dp.all_reduce_grads_(buffer)
                if self.constant is not None:
                    torch._foreach_add_(self.grad_buffers, self.constant)
            for seg, seg_lrs, kwargs in zip(self.segments, lrs, self._rmsprop_kwargs):
                if t == 0 and not self.checked:  # checked once: the rest repeat this call
                    rmsprop_step_(seg.params, seg.grads, seg.square_avgs, seg.momentum_bufs,
                                  lr=seg_lrs[t], **kwargs)
                else:
                    rmsprop_step_checked_again_(seg.params, seg.grads, seg.square_avgs,
                                                seg.momentum_bufs or [], [], seg_lrs[t],
                                                seg.options, seg.backend)

    def run(self) -> None:
        """T inner iterations; with eta, the prox centre is the params at entry."""
        if self.prox_centre is not None:
            torch._foreach_copy_(*self.prox_centre)
        self._runs += 1
        if self.use_graph and self._runs >= 2:
            if self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
                return
        # Eager: on CUDA the device rates (no sync, same values as a replay); elsewhere the
        # host floats.
        self._iterations(self._lr_views if self._on_device else self._host_lrs)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._iterations(self._lr_views)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
            self.use_graph = False
            self.graph_state = f"eager (capture failed: {type(error).__name__}: {error})"
            return  # nothing ran during the failed capture: run() goes on eagerly
        self._graph = graph
        self.graph_state = "graph"
