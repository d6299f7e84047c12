"""LocoProp's inner loop over all layers at once, eager or replayed as one CUDA graph.

With the inputs X_l and targets Y_l of every layer fixed (``LayerGroup.inputs/targets``), it
takes T RMSProp steps on all local problems together (DESIGN.md section 2):

    for t in 0..T-1:
        grads <- every layer's matched-loss gradient at params          (2 launches, triton)
        rmsprop_step_(params, grads, ms, mom, lr = lr * max(1 - t/T, floor))  (1 launch)

All of params, grads and the RMSProp state are flat buffers in ``param_shapes`` layout.

CUDA graph (``cuda_graph=True``, where the backend can be captured: triton on CUDA): the first ``run()`` is eager (it also
compiles the kernels); the second captures the T iterations once; every later run replays
them. The per-iteration learning rates live in a device tensor that ``set_lr`` rewrites with a
device op, so a replay needs no host work and a new outer lr needs no re-capture. Where
capture is not possible (CPU, another backend, or a capture error) the loop stays eager and
gives the same results: ``graph_state`` says which path is in use.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .grouped import LayerGroup
from .ops import rmsprop_step_
from .rmsprop_options import RMSpropOptions

#: The official LocoProp code's inner RMSProp (DESIGN.md section 2).
OFFICIAL_RMSPROP = RMSpropOptions(style="tf", alpha=0.9, eps=1e-5, momentum=0.999)


def inner_lr_factors(inner_steps: int, floor: float) -> list:
    """lr_t / lr = max(1 - t/T, floor) for t = 0..T-1."""
    return [max(1.0 - t / inner_steps, floor) for t in range(inner_steps)]


class InnerLoop:
    """T RMSProp steps on every layer's local problem; see the module docstring."""

    def __init__(self, group: LayerGroup, params: torch.Tensor, square_avgs: torch.Tensor,
                 momentum_bufs: torch.Tensor, *, inner_steps: int = 10, lr: float = 1e-5,
                 lr_floor: float = 0.25, options: RMSpropOptions = OFFICIAL_RMSPROP,
                 scale: float = 1.0,
                 eta: Optional[float] = None, grads: Optional[torch.Tensor] = None,
                 cuda_graph: bool = False):
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"locoprop.InnerLoop: argument 'inner_steps' expected an int "
                             f">= 1, got {inner_steps!r}")
        self.group = group
        self.params, self.square_avgs, self.momentum_bufs = params, square_avgs, momentum_bufs
        self.grads = grads if grads is not None else torch.zeros(
            params.shape, dtype=torch.float32, device=params.device)
        self.anchors = params.detach().clone() if eta is not None else None
        self.inner_steps = inner_steps
        self.rms = dict(dataclasses.asdict(options.check("InnerLoop")),
                        backend=group.backend.name)  # keywords of rmsprop_step_
        self.scale, self.eta = scale, eta
        self.lr_floor = lr_floor
        self._lrs = torch.empty(inner_steps, dtype=torch.float32, device=params.device)
        self._lr_views = [self._lrs[t:t + 1] for t in range(inner_steps)]
        self.set_lr(lr)
        self.use_graph = cuda_graph and group.backend.can_capture_graph(params.device)
        self.graph_state = "eager" if not self.use_graph else "warmup"
        self._graph = None
        self._runs = 0

    def set_lr(self, lr: float) -> None:
        """The outer learning rate; the per-iteration rates follow the inner schedule.

        The rates are formed in float64 on the host (as a float argument would be) and copied
        into the device tensor that the kernels, and a captured graph, read: a new outer lr
        costs one small copy and no re-capture."""
        self.lr = float(lr)
        self._host_lrs = [self.lr * f for f in inner_lr_factors(self.inner_steps, self.lr_floor)]
        self._lrs.copy_(torch.tensor(self._host_lrs, dtype=torch.float32))

    def _iterations(self, lrs) -> None:
        for t in range(self.inner_steps):
            self.group.matched_loss_grads_(self.params, self.grads, scale=self.scale,
                                           anchors=self.anchors, eta=self.eta)
            rmsprop_step_(self.params, self.grads, self.square_avgs, self.momentum_bufs,
                          lr=lrs[t], **self.rms)

    def run(self) -> None:
        """T inner iterations; with eta, the prox centre is the params at entry."""
        if self.anchors is not None:
            self.anchors.copy_(self.params)
        self._runs += 1
        if self.use_graph and self._runs >= 2:
            if self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
                return
        # Eager: on CUDA the device rates (no sync, same values as a replay); elsewhere the
        # host floats.
        self._iterations(self._lr_views if self.params.is_cuda else self._host_lrs)

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
