"""The Gram form of a quadratic local loss (``lk.optim.LocoProp``, docs/design.md section 9).

A layer with f = identity (every layer under variant S; under M a layer without an activation)
has a quadratic local loss, whose inner gradient needs X only through X^T X and X^T 1: formed
once per step, they replace the two row-sized GEMMs of every inner iteration with one
d_out x d_in x d_in GEMM, where ``uses_gram`` says that is cheaper. ``add_gram_grad_`` is that
gradient on plain tensors, the one implementation of both strategies: ``Quadratic`` holds one
layer's terms on the per-layer strategy, ``GramTerms`` a ``grouped.LayerGroup``'s Gram layers
in static flat buffers on the grouped one (capturable in its CUDA graph).
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..arena import Arena
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


def add_gram_grad_(grad_w: Tensor, grad_b: Optional[Tensor], delta_w: Tensor,
                   delta_b: Optional[Tensor], gram: Tensor, x_sum: Tensor, rows: int,
                   scale: float) -> None:
    """The Gram-form local gradient of one quadratic layer, added in place (the one
    implementation both strategies use: ``Quadratic`` per layer, ``GramTerms`` grouped):

        grad_w += scale [delta_w gram + delta_b x_sum^T]        (d_out, d_in)
        grad_b += scale [delta_w x_sum + rows delta_b]          (d_out,)

    with delta_w = W - W0 (d_out, d_in), delta_b = b - b0 (d_out,) or None (no bias),
    gram = X^T X (d_in, d_in), x_sum = X^T 1 (d_in,). ``grad_b`` None: the bias has no
    gradient slot (its term in grad_w still counts). In-place GEMM/GEMV and elementwise ops
    only: no allocation, no host sync (capturable in a CUDA graph)."""
    grad_w.addmm_(delta_w, gram, alpha=scale)
    if delta_b is None:
        return
    grad_w.addr_(delta_b, x_sum, alpha=scale)
    if grad_b is not None:
        grad_b.addmv_(delta_w, x_sum, alpha=scale)
        grad_b.add_(delta_b, alpha=scale * rows)


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
        delta_b = None if self.bias is None else self.bias.detach().to(self.w0.dtype) - self.b0
        grad_b = grads[self.bias] if self.bias is not None and self.bias in grads else None
        add_gram_grad_(grad_w, grad_b, delta, delta_b, self.gram, self.x_sum, self.rows, scale)


class GramTerms:
    """The Gram form of some layers of a flat parameter layout (``grouped.LayerGroup``'s
    Gram layers, the grouped strategy), in static buffers this object owns:

        gram_l = X_l^T X_l (d_in, d_in), x_sum_l = X_l^T 1 (d_in,)    (``form_``)
        start_l = W0_l, b0_l: the parameters when ``form_`` ran     (their flat layout)

    ``form_`` runs once per outer step, after X_l and the parameters are in place and before
    the inner loop (outside any CUDA graph). ``write_grads_`` then sets, at every inner
    iteration t >= 1, each Gram layer's slots of the flat gradient buffer to

        grad_W_l = scale [(W_l - W0_l) gram_l + (b_l - b0_l) x_sum_l^T] [+ (W_l - A_l) / eta]
        grad_b_l = scale [(W_l - W0_l) x_sum_l + rows (b_l - b0_l)]     [+ (b_l - a_l) / eta]

    (``add_gram_grad_``; A, a: the prox anchors). Capturable by construction: it writes only
    into its own preallocated buffers and the caller's flat ones (``torch.sub(out=)``,
    ``zero_``, in-place GEMM/GEMV), allocates nothing and never syncs with the host.

    ``layers``: one dict per Gram layer with ``w_off``, ``b_off`` (None without bias) in the
    flat parameter layout, ``d_in``, ``d_out``; ``inputs``: their X (rows, d_in) views."""

    def __init__(self, layers: Sequence[dict], inputs: Sequence[Tensor], rows: int, *,
                 dtype: torch.dtype, device):
        self.layers, self.inputs, self.rows = list(layers), list(inputs), rows
        self.grams = Arena([(l["d_in"], l["d_in"]) for l in self.layers], dtype=dtype,
                           device=device, fill=None)
        self.x_sums = Arena([(l["d_in"],) for l in self.layers], dtype=dtype, device=device,
                            fill=None)
        shapes = [s for l in self.layers for s in self._param_shapes(l)]
        # W0/b0 of each Gram layer, and a scratch of the same layout for W - W0 (and W - A).
        self.start = Arena(shapes, dtype=dtype, device=device, fill=None)
        self.delta = Arena(shapes, dtype=dtype, device=device, fill=None)
        self.formed = False

    @staticmethod
    def _param_shapes(layer: dict) -> list:
        shapes = [(layer["d_out"], layer["d_in"])]
        if layer["b_off"] is not None:
            shapes.append((layer["d_out"],))
        return shapes

    def _slots(self, flat: Tensor):
        """Per Gram layer: (W view, b view or None) of a flat buffer in the parameter layout."""
        for l in self.layers:
            n_w = l["d_out"] * l["d_in"]
            w = flat[l["w_off"]:l["w_off"] + n_w].view(l["d_out"], l["d_in"])
            b = None if l["b_off"] is None else flat[l["b_off"]:l["b_off"] + l["d_out"]]
            yield w, b

    def _own(self, arena: Arena):
        """Per Gram layer: (W-shaped view, b-shaped view or None) of one of our arenas."""
        views, i = arena.views(), 0
        for l in self.layers:
            has_b = l["b_off"] is not None
            yield views[i], views[i + 1] if has_b else None
            i += 2 if has_b else 1

    def form_(self, params: Tensor) -> None:
        """X^T X, X^T 1 from the filled inputs, and W0, b0 from ``params`` (once per step)."""
        for x, gram, x_sum in zip(self.inputs, self.grams.views(), self.x_sums.views()):
            torch.mm(x.t(), x, out=gram)
            torch.sum(x, dim=0, out=x_sum)
        for (w, b), (w0, b0) in zip(self._slots(params), self._own(self.start)):
            w0.copy_(w)
            if b is not None:
                b0.copy_(b)
        self.formed = True

    def write_grads_(self, params: Tensor, grads: Tensor, *, scale: float,
                     anchors: Optional[Tensor] = None, eta: Optional[float] = None) -> None:
        """Each Gram layer's slots of ``grads`` <- its local gradient at ``params`` (above);
        the other slots are left as they are. ``anchors`` (flat) with ``eta``."""
        if not self.formed:
            raise RuntimeError("locoprop.GramTerms: write_grads_ before form_ (X^T X and W0 "
                               "are formed once per step, after the inputs are filled)")
        anchor_slots = (self._slots(anchors) if eta is not None
                        else itertools.repeat((None, None)))
        for (w, b), (g_w, g_b), (w0, b0), (d_w, d_b), gram, x_sum, (a_w, a_b) in zip(
                self._slots(params), self._slots(grads), self._own(self.start),
                self._own(self.delta), self.grams.views(), self.x_sums.views(), anchor_slots):
            torch.sub(w, w0, out=d_w)
            g_w.zero_()
            if b is not None:
                torch.sub(b, b0, out=d_b)
                g_b.zero_()
            add_gram_grad_(g_w, g_b, d_w, None if b is None else d_b, gram, x_sum, self.rows,
                           scale)
            if eta is not None:  # the prox term; the scratch is free again
                torch.sub(w, a_w, out=d_w)
                g_w.add_(d_w, alpha=1.0 / eta)
                if b is not None:
                    torch.sub(b, a_b, out=d_b)
                    g_b.add_(d_b, alpha=1.0 / eta)
