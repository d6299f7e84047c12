"""Every layer's local problem at once: matched-loss gradients of all layers in two launches.

LocoProp's inner loop computes, for every layer l and T times over, the gradient of that
layer's local objective (``matched_loss_grad``). On small layers the per-layer launches cost
more than the arithmetic, so ``LayerGroup`` holds the inputs, targets and deltas of all
layers in flat arenas and asks its backend for a grouped entry
(``Backend.grouped_matched_loss_grad``): on triton, stage 1 of every layer is one launch and
stage 2 of every layer another. Backends without one run the same math layer by layer through
``matched_loss_grad`` (the results are the same; only the launch count differs).

Gram layers (``gram=``, one flag per layer; f = identity only): a quadratic local loss whose
gradient needs X only through X^T X and X^T 1 (``optim/gram.py``). They are left out of the
matched-loss launches (``layer_table()`` lists the matched layers only, at their flat offsets);
``form_gram_`` forms X^T X, X^T 1 and keeps W0, b0 once per outer step, and every
``matched_loss_grads_`` writes their slots with one d_out x d_in x d_in GEMM each
(``GramTerms``) instead of two rows-sized ones.

The delta form (``anchored=True``; LocoProp's inner iterations at precision tf32/bf16,
docs/design.md section 4): stage 1's pre-activation is Z_l = Z0_l + X_l (W_l - W0_l)^T
+ (b_l - b0_l), so that only the small update W - W0 goes through the low-precision dot. Z0
lives in ``anchor_preacts`` (the targets' shapes and offsets), W0, b0 in ``start_params`` (the
flat layout); the caller fills both once per outer step (``form_anchors_``).

Layout. Parameters of all layers live in one flat buffer in ``nn.Sequential`` order:
W_0 (d_out, d_in), b_0 (d_out,) if the layer has a bias, W_1, b_1, ...; ``param_shapes``
gives it. Gradients and prox anchors use the same layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import backends
from .activations import get_activation
from .arena import Arena, layout_offsets, split_views
from .ops import matched_loss_grad
from .optim.gram import GramTerms
from .validation import check_number, check_tensor, fail_value

OP = "LayerGroup"


@dataclass(frozen=True)
class LayerSpec:
    """One Linear + f layer: sizes, the activation of its local loss, whether it has a bias."""

    d_in: int
    d_out: int
    activation: str
    bias: bool = True


def param_shapes(layers: Sequence[LayerSpec]) -> list:
    """Shapes of the flat parameter layout: W_0, b_0, W_1, b_1, ... (b_l only with a bias)."""
    shapes = []
    for layer in layers:
        shapes.append((layer.d_out, layer.d_in))
        if layer.bias:
            shapes.append((layer.d_out,))
    return shapes


class LayerGroup:
    """The inputs, targets and scratch of all layers' local problems for one batch size.

    ``inputs[l]`` (B, d_in_l) and ``targets[l]`` (B, d_out_l) are views the caller fills
    (once per outer step); ``matched_loss_grads_`` then writes every layer's gradient into a
    flat gradient buffer (``param_shapes`` layout). Build once per (layers, batch, device,
    dtype, gram flags): the triton backend's tile tables are made here, not per call.

    ``gram``: one flag per layer (default: none), the layers that take the Gram form (their
    activation must be "identity"). Their ``targets[l]`` are not read; after filling their
    ``inputs[l]`` and the parameters, call ``form_gram_(params)`` once per outer step.

    ``anchored``: stage 1 in the delta form. ``anchor_preacts[l]`` (B, d_out_l), Z0_l, are
    views the caller fills beside the targets (a Gram layer's are not read), and
    ``form_anchors_(params)`` copies W0, b0 into ``start_params``, once per outer step.
    """

    def __init__(self, layers: Sequence[LayerSpec], batch: int, *, device, dtype=torch.float32,
                 backend: Optional[str] = None, precision: str = "ieee",
                 gram: Optional[Sequence[bool]] = None, anchored: bool = False):
        if not layers:
            fail_value(OP, "layers", "at least one LayerSpec", "an empty list")
        for i, layer in enumerate(layers):
            get_activation(layer.activation, op=f"locoprop.{OP}")
            if layer.d_in < 1 or layer.d_out < 1:
                fail_value(OP, f"layers[{i}]", "d_in >= 1 and d_out >= 1", layer)
        if not isinstance(batch, int) or batch < 1:
            fail_value(OP, "batch", "an int >= 1", batch)
        gram = (False,) * len(layers) if gram is None else tuple(gram)
        if len(gram) != len(layers) or not all(isinstance(g, bool) for g in gram):
            fail_value(OP, "gram", f"{len(layers)} bools (one per layer)", gram)
        for i, (layer, g) in enumerate(zip(layers, gram)):
            if g and layer.activation != "identity":
                fail_value(OP, f"gram[{i}]", "False for a layer whose activation is not "
                           "'identity' (only a quadratic local loss has a Gram form)",
                           f"True with {layer.activation!r}")
        if not isinstance(anchored, bool):
            fail_value(OP, "anchored", "a bool", anchored)
        self.gram = gram
        self.anchored = anchored
        self.layers = list(layers)
        self.batch = batch
        # "cuda" -> "cuda:0" (the current device): tensors report an index, and the flat
        # buffers' device checks compare against this.
        self.device = torch.empty(0, device=device).device
        self.dtype = dtype
        self.precision = precision
        self.param_shapes = param_shapes(self.layers)
        self.num_params = layout_offsets(self.param_shapes)[-1]
        self.inputs = Arena([(batch, l.d_in) for l in self.layers], dtype=dtype, device=device)
        self.targets = Arena([(batch, l.d_out) for l in self.layers], dtype=dtype,
                             device=device)
        # The delta form's Z0 (targets' layout) and W0, b0 (params' layout); filled per step.
        self.anchor_preacts = None if not anchored else Arena(
            [(batch, l.d_out) for l in self.layers], dtype=dtype, device=device)
        self.start_params = None if not anchored else torch.empty(
            self.num_params, dtype=dtype, device=self.device)
        self.backend = backends.resolve(OP, backend, self.device, dtype)
        rows = self._layer_rows()
        self._gram = None if not any(gram) else GramTerms(
            [r for r, g in zip(rows, gram) if g],
            [x for x, g in zip(self.inputs.views(), gram) if g], batch, dtype=dtype,
            device=self.device)
        # No grouped launch when every layer takes the Gram form (nothing left to launch for).
        self._grouped = None if all(gram) else self.backend.grouped_matched_loss_grad(self)

    def layer_table(self) -> list:
        """One dict per matched (non-Gram) layer, in order: offsets of X_l (``x_off``), W_l,
        b_l (None without bias) and Y_l (``yd_off``) in their flat buffers, d_in, d_out and the
        activation code. What a backend's grouped entry launches for: Gram layers are left
        out, the others keep their offsets in the full layout."""
        return [r for r, g in zip(self._layer_rows(), self.gram) if not g]

    def _layer_rows(self) -> list:
        """``layer_table``'s dict for every layer, Gram layers included."""
        rows, p = [], 0
        offsets = layout_offsets(self.param_shapes)
        for i, layer in enumerate(self.layers):
            w_off = offsets[p]
            b_off = offsets[p + 1] if layer.bias else None
            p += 2 if layer.bias else 1
            rows.append(dict(x_off=self.inputs.offsets[i], w_off=w_off, b_off=b_off,
                             yd_off=self.targets.offsets[i], d_in=layer.d_in,
                             d_out=layer.d_out, code=get_activation(layer.activation).code))
        return rows

    def _check_flat(self, arg: str, t, dtype=None) -> None:
        check_tensor(OP, arg, t, shape=(self.num_params,), device=self.device, dtype=dtype,
                     what=" (the flat parameter layout)")
        if not t.is_contiguous():
            fail_value(OP, arg, "a contiguous flat buffer", f"strides {t.stride()}")

    def form_gram_(self, params: torch.Tensor) -> None:
        """Once per outer step, after ``inputs`` and ``params`` (flat) hold the step's values
        and before the inner loop (outside any CUDA graph): X^T X and X^T 1 of every Gram
        layer and its W0, b0 (``GramTerms.form_``). Nothing without Gram layers."""
        self._check_flat("params", params, dtype=self.dtype)
        if self._gram is not None:
            self._gram.form_(params)

    def form_anchors_(self, params: torch.Tensor) -> None:
        """Once per outer step (anchored groups only), with ``params`` (flat) at the step's
        start, the weights ``anchor_preacts`` were computed with, and outside any CUDA graph:
        W0, b0 <- params."""
        if not self.anchored:
            fail_value(OP, "form_anchors_", "a group built with anchored=True",
                       "anchored=False")
        self._check_flat("params", params, dtype=self.dtype)
        self.start_params.copy_(params)

    def matched_loss_grads_(self, params: torch.Tensor, grads: torch.Tensor, *,
                            scale: float = 1.0, anchors: Optional[torch.Tensor] = None,
                            eta: Optional[float] = None) -> None:
        """grads <- every layer's matched-loss gradient at ``params`` (flat buffers):

            grad_W_l = scale * D_l^T X_l [+ (W_l - A_l)/eta],  D_l = f_l(X_l W_l^T + b_l) - Y_l
            grad_b_l = scale * sum_n D_l[n] [+ (b_l - a_l)/eta]

        with X_l = ``inputs[l]``, Y_l = ``targets[l]``, A = ``anchors`` (needed with eta). A
        Gram layer takes the same gradient for the target Y_l = X_l W0_l^T + b0_l (W0, b0 as at
        ``form_gram_``) in its Gram form, outside the matched-loss launches. An anchored group
        forms X_l W_l^T + b_l as Z0_l + X_l (W_l - W0_l)^T + (b_l - b0_l) (``anchor_preacts``,
        ``start_params``).
        """
        self._check_flat("params", params, dtype=self.dtype)
        self._check_flat("grads", grads)
        check_number(OP, "scale", scale)
        if eta is not None:
            check_number(OP, "eta", eta, low=0.0, low_open=True)
            self._check_flat("anchors", anchors, dtype=self.dtype)
        if self._grouped is not None:
            self._grouped(params, grads, scale=scale, anchors=anchors, eta=eta)
        else:
            self._matched_layer_by_layer(params, grads, scale, anchors, eta)
        if self._gram is not None:
            self._gram.write_grads_(params, grads, scale=scale, anchors=anchors, eta=eta)

    def _matched_layer_by_layer(self, params, grads, scale, anchors, eta) -> None:
        """The matched layers' gradients, one ``matched_loss_grad`` op each (no grouped
        entry on this backend)."""
        p_views = split_views(params, self.param_shapes)
        g_views = split_views(grads, self.param_shapes)
        a_views = split_views(anchors, self.param_shapes) if eta is not None else None
        s_views = split_views(self.start_params, self.param_shapes) if self.anchored else None
        p = 0
        for i, layer in enumerate(self.layers):
            k = 2 if layer.bias else 1
            if self.gram[i]:
                p += k
                continue
            w, b = p_views[p], (p_views[p + 1] if layer.bias else None)
            out = (g_views[p], g_views[p + 1] if layer.bias else None)
            anchor = (a_views[p], a_views[p + 1] if layer.bias else None) if a_views else (None, None)
            if not self.anchored:
                matched_loss_grad(self.inputs[i], w, b, self.targets[i], layer.activation,
                                  scale=scale, anchor_weight=anchor[0], anchor_bias=anchor[1],
                                  eta=eta, backend=self.backend.name,
                                  precision=self.precision, out=out)
            else:
                # The op has one (W0, b0) pair, its delta form's and its prox centre: the
                # delta form takes start_params, the prox term (centre A) is added after.
                matched_loss_grad(self.inputs[i], w, b, self.targets[i], layer.activation,
                                  scale=scale, anchor_weight=s_views[p],
                                  anchor_bias=s_views[p + 1] if layer.bias else None,
                                  backend=self.backend.name, precision=self.precision,
                                  out=out, anchor_preact=self.anchor_preacts[i])
                if eta is not None:
                    out[0].add_(w - anchor[0], alpha=1.0 / eta)
                    if layer.bias:
                        out[1].add_(b - anchor[1], alpha=1.0 / eta)
            p += k

