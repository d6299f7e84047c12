"""The Gram form of a quadratic local loss (``lk.optim.LocoProp``, docs/design.md section 9).

A layer with f = identity (every layer under variant S; under M a layer without an activation)
has a quadratic local loss, whose inner gradient needs X only through X^T X and X^T 1: formed
once per step, they replace the two row-sized GEMMs of every inner iteration with one
d_out x d_in x d_in GEMM (``Quadratic``), where ``uses_gram`` says that is cheaper.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import layer_params, stores_in_out


def uses_gram(rows: int, d_in: int, d_out: int, inner_steps: int) -> bool:
    """Whether the Gram form of a quadratic local loss (``Quadratic``) costs fewer
    multiply-adds per step than the matched-loss op, counting the GEMMs only.

    The op takes two (rows x d_in x d_out) GEMMs in each of the T - 1 iterations t >= 1
    (t = 0 needs none). The Gram form takes X^T X once (rows x d_in x d_in) and one
    (d_out x d_in x d_in) GEMM per iteration:

        rows d_in^2 + (T - 1) d_out d_in^2  <  2 (T - 1) rows d_out d_in,
        i.e.  rows d_in + (T - 1) d_out d_in  <  2 (T - 1) rows d_out.

    For a square layer (d_in = d_out = d) at T = 10 that is d < 1.89 rows: any layer with
    more rows (batch x sequence) than about half its width."""
    t = inner_steps - 1
    return t >= 1 and rows * d_in + t * d_out * d_in < 2 * t * rows * d_out


class Quadratic:
    """A layer whose local loss is quadratic (f = identity: variant S, or a layer without an
    activation), in its Gram form. With Z = X W^T + 1 b^T and the target Z0 = X W0^T + 1 b0^T
    (what the layer computed at W0, b0), the local gradient (without the prox term and C) is

        dW = s (Z - Z0)^T X = s [(W - W0) X^T X + (b - b0) (X^T 1)^T]      (d_out, d_in)
        db = s (Z - Z0)^T 1 = s [(W - W0) X^T 1 + rows (b - b0)]            (d_out,)

    so X^T X (d_in, d_in) and X^T 1 (d_in,), formed once per step, serve all T - 1 inner
    iterations: one (d_out x d_in x d_in) GEMM instead of the op's two (rows x d_in x d_out)
    ones. Exact (the same function of W, b; only the rounding differs), and at W0 exactly 0.
    Weights are kept as (d_out, d_in) views whatever the module stores (Conv1D: (d_in, d_out))."""

    __slots__ = ("weight", "bias", "in_out", "w0", "b0", "gram", "x_sum", "rows")

    def __init__(self, layer: nn.Module, x: Tensor):
        self.weight, self.bias = layer_params(layer)
        self.in_out = stores_in_out(layer)
        self.w0 = self._w(self.weight, x.dtype).clone()
        self.b0 = None if self.bias is None else self.bias.detach().to(x.dtype).clone()
        self.gram = x.t() @ x
        self.x_sum = x.sum(dim=0)
        self.rows = x.shape[0]

    def _w(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        w = weight.detach().to(dtype)
        return w.t() if self.in_out else w

    def add_grad_(self, grads, scale: float) -> None:
        """grads[W], grads[b] += the local gradient above at the current weights."""
        delta = self._w(self.weight, self.w0.dtype) - self.w0
        grad_w = grads[self.weight]
        grad_w = grad_w.t() if self.in_out else grad_w
        grad_w.addmm_(delta, self.gram, alpha=scale)
        if self.bias is None:
            return
        delta_b = self.bias.detach().to(self.w0.dtype) - self.b0
        grad_w.addr_(delta_b, self.x_sum, alpha=scale)
        if self.bias in grads:
            grad_b = grads[self.bias]
            grad_b.addmv_(delta, self.x_sum, alpha=scale)
            grad_b.add_(delta_b, alpha=scale * self.rows)
