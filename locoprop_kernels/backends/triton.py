"""The "triton" backend: the fused Triton kernels of ``locoprop_kernels.triton_kernels``.

CUDA tensors; CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``, the
tests). fp32/fp16/bf16 storage, fp32 accumulation and optimizer state. The kernels take
contiguous tensors: anything else goes through a contiguous copy written back afterwards.
A Linear layer's matched-loss gradient takes one of two routes per shape, the faster as timed
once on CUDA (``_routes.py``): the two fused Triton GEMM kernels, or torch's GEMMs (cuBLAS)
between the Conv2d path's delta and finish passes.
Every kernel loads each tensor in its own storage dtype and converts it to fp32 in registers,
and stores in the destination's dtype, so mixed precision (half x and target, fp32 weight,
bias and outputs) needs no copy here: only the kernel specialisation differs.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from ..activations import get_activation
from . import _conv as conv
from . import _routes
from .base import Backend

_SOFTMAX_CODE = get_activation("softmax").code


def _contiguous_out(out, fill):
    """Run ``fill(buffer)`` on ``out`` itself when contiguous, else on a copy written back."""
    if out is None or out.is_contiguous():
        fill(out)
        return
    tmp = out.contiguous()
    fill(tmp)
    out.copy_(tmp)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _conv_operand(t, precision: str):
    """t as the fp32 operand of a convolution at ``precision``: for "bf16" its values rounded
    to bf16 (torch's round-to-nearest-even), so that an fp32 convolution of them computes
    bf16 products exactly and accumulates in fp32, what a bf16 GEMM with fp32 accumulation
    does; the output stays fp32 (a bf16 convolution would round Z and G_W to bf16 too)."""
    return t.to(torch.bfloat16).float() if precision == "bf16" else t.float()


def _conv_mode(precision: str) -> str:
    """cuDNN's math mode for ``precision``: bf16-valued operands are exact in tf32, so "bf16"
    runs on cuDNN's tf32 tensor-core path at no accuracy cost."""
    return "tf32" if precision == "bf16" else precision


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device):
    """torch's fp32 matmul on CUDA in IEEE fp32 ("ieee": cuBLAS's TF32 off for the block) or
    TF32 ("tf32"), as ``_conv.conv_precision`` does for cuDNN. Nothing to do on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@functools.lru_cache(maxsize=None)
def _native_bf16_mm(device: torch.device) -> bool:
    """Whether torch.mm multiplies bf16 matrices into an fp32 result on ``device``
    (``out_dtype=torch.float32``: bf16 tensor cores, fp32 accumulation, Z never rounded to
    bf16). CUDA builds of recent torch have it; elsewhere the "bf16" GEMMs run on
    bf16-rounded fp32 operands (``_conv_operand``), the same products at half the tensor-core
    rate. Probed once per device."""
    if device.type != "cuda":
        return False
    # The route's two layouts: X W^T (a transposed right operand), D^T X (a transposed left).
    x = torch.ones(16, 32, dtype=torch.bfloat16, device=device)
    w = torch.ones(24, 32, dtype=torch.bfloat16, device=device)
    try:
        z = torch.mm(x, w.T, out_dtype=torch.float32)
        g = torch.mm(z.to(torch.bfloat16).T, x, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return z.dtype == g.dtype == torch.float32 and g.shape == (24, 32)


def _gemm_operand(t, precision: str, native_bf16: bool):
    """t as an operand of ``_gemm``: bf16 for the native bf16 GEMM, else ``_conv_operand``'s
    fp32 (bf16-rounded values for "bf16")."""
    return t.to(torch.bfloat16) if native_bf16 else _conv_operand(t, precision)


def _gemm(a, b, precision: str, native_bf16: bool):
    """a @ b as a contiguous fp32 matrix at ``precision``, fp32 accumulation: native bf16
    operands (``_native_bf16_mm``), or fp32 operands in IEEE fp32 or TF32 (bf16-valued ones
    are exact in TF32: ``_conv_mode``). The kernels after it index it row-major."""
    if native_bf16:
        return torch.mm(a, b, out_dtype=torch.float32).contiguous()
    with _matmul_precision(_conv_mode(precision), a.device):
        return torch.mm(a, b).contiguous()


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    reads_lr_from_device = True  # the RMSProp kernel loads lr through a pointer

    def __init__(self):
        self.kernels = importlib.import_module("locoprop_kernels.triton_kernels")
        self.conv_kernels = importlib.import_module(
            "locoprop_kernels.triton_kernels.conv_matched_loss_grad")

    @staticmethod
    def unavailable_reason(device: torch.device):
        """Why this backend cannot run on ``device``, or None when it can."""
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return (f"needs CUDA tensors, got device {device}; on CPU it runs only under the "
                    f"Triton interpreter (set TRITON_INTERPRET=1 before importing "
                    f"locoprop_kernels)")
        return None

    def implements(self, activation, op):
        # A registered row with a @triton.jit f runs in the per-layer Linear kernel.
        return activation.builtin or (activation.triton_f is not None
                                      and op.startswith("matched_loss_grad")
                                      and "conv2d" not in op)

    def can_capture_graph(self, device):
        return device.type == "cuda"

    def prefers_grouped(self, device):
        return device.type == "cuda"

    def launches(self):
        return self.kernels.LAUNCHES["triton"]

    def grouped_matched_loss_grad(self, group):
        grouped = importlib.import_module(
            "locoprop_kernels.triton_kernels.grouped_matched_loss_grad")
        deltas = torch.empty(group.targets.buffer.numel(), dtype=torch.float32,
                             device=group.device)
        plan = grouped.plan(group.batch, group.layer_table(), group.device, dtype=group.dtype,
                            precision=group.precision, anchored=group.anchored)
        # The delta form's W0, b0 and Z0: the group's own buffers, filled once per outer step.
        delta_form = {} if not group.anchored else dict(
            start_params=group.start_params, anchor_preacts=group.anchor_preacts.buffer)

        def run(params, grads, *, scale, anchors, eta):
            grouped.grouped_matched_loss_grad_(
                plan, group.inputs.buffer, params, group.targets.buffer, deltas, grads,
                scale=scale, anchors=anchors, eta=eta, **delta_form)

        return run

    def matched_loss_grad_into(self, x, weight, bias, target, activation, scale, anchor_weight,
                               anchor_bias, eta, out_weight, out_bias, precision,
                               anchor_preact=None):
        """One of two routes per shape (``_routes.py``): the two fused Triton GEMM kernels
        ("fused"), or torch's GEMMs with our epilogue and finish passes around them
        ("gemm", ``_gemm_route``). A registered activation's ``triton_f`` runs only in the
        fused kernel. ``anchor_preact`` Z0: stage 1 in the delta form on either route."""
        c = _contiguous
        row = get_activation(activation)
        user_f = None if row.builtin else row.triton_f
        x, weight, bias, target = c(x), c(weight), c(bias), c(target)
        has_prox, anchored = eta is not None, anchor_preact is not None
        if not has_prox and not anchored:
            anchor_weight = anchor_bias = None
        anchor_weight, anchor_bias = c(anchor_weight), c(anchor_bias)
        anchor_preact = c(anchor_preact)
        if user_f is not None:
            kind = f"registered {row.name}"
        else:
            kind = "softmax" if row.code == _SOFTMAX_CODE else "elementwise"

        def fill(gw, gb):
            runs = {"fused": lambda: self.kernels.matched_loss_grad_into(
                x, weight, bias, target, row.code, scale, anchor_weight, anchor_bias, eta, gw,
                gb, precision=precision, user_f=user_f, anchor_preact=anchor_preact)}
            if user_f is None:
                runs["gemm"] = lambda: self._gemm_route(
                    x, weight, bias, target, row.code, scale, anchor_weight, anchor_bias, eta,
                    gw, gb, precision, anchor_preact)
            # A key's first call on CUDA may time both routes: those launches are the
            # chooser's (reported in routes()), not this call's, so launches() leaves them out.
            launches = self.kernels.LAUNCHES["triton"]
            route = _routes.CHOOSER.choose(x, weight, kind, precision, has_prox, runs,
                                           anchored)
            self.kernels.LAUNCHES["triton"] = launches
            runs[route]()

        _contiguous_out(out_weight, lambda gw: _contiguous_out(out_bias, lambda gb: fill(gw, gb)))

    def _gemm_route(self, x, weight, bias, target, code, scale, anchor_weight, anchor_bias,
                    eta, out_weight, out_bias, precision, anchor_preact=None):
        """The "gemm" route on contiguous tensors (the cpp CUDA backend's shape):

            Z = X W^T                     torch.mm at ``precision`` (``_gemm``), fp32 (B, d_out)
              (= Z0 + X (W - W0)^T        with ``anchor_preact`` Z0: only the update W - W0,
                                          formed in fp32, is a low-precision operand; Z0 is
                                          added in fp32, and b - b0 stands in for b below)
            Z <- f(Z + b) - Y = D         ``delta_rows_``, in place (softmax rows included)
            G = D^T X                     torch.mm at ``precision``, fp32 (d_out, d_in)
            grad_W = scale G [+ (W - W0)/eta], grad_b = scale sum_n D [+ (b - b0)/eta]
                                          ``finish_into``, one launch

        Two Triton launches, as the fused route, plus two library GEMMs."""
        kernels = self.conv_kernels
        native = _native_bf16_mm(x.device) if precision == "bf16" else False
        x_op = _gemm_operand(x, precision, native)
        if anchor_preact is None:
            delta = _gemm(x_op, _gemm_operand(weight, precision, native).T, precision, native)
            delta_bias = bias
        else:
            update = weight.float() - anchor_weight.float()
            delta = _gemm(x_op, _gemm_operand(update, precision, native).T, precision, native)
            delta += anchor_preact
            delta_bias = None if bias is None else bias.float() - anchor_bias.float()
        kernels.delta_rows_(delta, delta_bias, target, code)
        grad_w32 = _gemm(_gemm_operand(delta, precision, native).T, x_op, precision, native)
        has_prox = eta is not None
        kernels.finish_into(grad_w32, delta, weight if has_prox else None, anchor_weight,
                            bias if has_prox else None, anchor_bias, scale, eta, out_weight,
                            out_bias)

    def matched_loss_grad_conv2d_into(self, x, weight, bias, target, activation, stride,
                                      padding, dilation, groups, scale, anchor_weight,
                                      anchor_bias, eta, out_weight, out_bias, precision,
                                      anchor_preact=None):
        """Torch's convolutions for the GEMMs, channels-last (``backends/_conv.py``); the
        delta D = f(Z + b) - Y and the scale/bias-sum/prox finish are Triton launches on the
        (R = N*H_out*W_out, C_out) row view of Z: two launches
        (``triton_kernels/conv_matched_loss_grad.py``).

        With ``anchor_preact`` Z0, stage 1 is the delta form
        Z = Z0 + conv2d(X, W - W0) + (b - b0): the update W - W0 is formed in fp32 and only it
        becomes a low-precision operand (rounded to bf16 at "bf16", not W), Z0 is added in
        fp32 and the delta kernel adds b - b0 (fp32) where it would add b."""
        kernels = self.conv_kernels
        anchored = anchor_preact is not None
        x32 = _conv_operand(x, precision)
        # The weight the convolution reads: at bf16 its rounding costs ~2^-9 |W|, which next
        # to a small inner update dW would be all of conv2d(X, dW): round dW instead.
        w32 = _conv_operand(weight.float() - anchor_weight.float() if anchored else weight,
                            precision)
        with conv.conv_precision(_conv_mode(precision), x.device):
            z = conv.preactivation(x32, w32, stride, padding, dilation, groups)
        delta_bias = _contiguous(bias)
        if anchored:
            z += anchor_preact  # fp32, in place: z stays channels-last whatever Z0's layout
            if bias is not None:
                delta_bias = bias.float() - anchor_bias.float()
        delta = conv.rows(z)
        kernels.delta_rows_(delta, delta_bias, conv.rows_copy(target),
                            get_activation(activation).code)
        # Stage 2, G_W = conv2d_weight_grad(X, D), needs no delta form: D is formed in fp32
        # from the accurate Z and then rounded relative to its own size, X relative to its
        # own; the convolution sums their products, no large term cancels a small one. (w32
        # gives the weight's shape only.)
        with conv.conv_precision(_conv_mode(precision), x.device):
            grad_w32 = conv.weight_grad(x32, w32, _conv_operand(z, precision), stride, padding,
                                        dilation, groups)
        c = _contiguous
        has_prox = eta is not None

        def fill_weight(gw):
            _contiguous_out(out_bias, lambda gb: kernels.finish_into(
                grad_w32, delta, c(weight) if has_prox else None,
                c(anchor_weight) if has_prox else None, c(bias) if has_prox else None,
                c(anchor_bias) if has_prox else None, scale, eta, gw, gb))

        _contiguous_out(out_weight, fill_weight)

    def local_targets_into(self, preact, grad_preact, activation, gamma, variant, out):
        code = get_activation(activation).code
        _contiguous_out(out, lambda y: self.kernels.local_targets_into(
            preact.contiguous(), grad_preact.contiguous(), code, gamma, variant, y))

    def rmsprop_step_(self, params, grads, square_avgs, momentum_bufs, grad_avgs, lr,
                      options):
        # In-place tensors with gaps or odd strides are updated through contiguous copies.
        written = (params, square_avgs, momentum_bufs, grad_avgs)
        work = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in written]
        self.kernels.rmsprop_step_(work[0], [g.contiguous() for g in grads], work[1], work[2],
                                   work[3], lr=lr, options=options)
        for originals, copies in zip(written, work):
            for t, w in zip(originals, copies):
                if t is not w:
                    t.copy_(w)
